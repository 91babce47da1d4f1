"""`saepipe report` (a self-contained HTML page with plots and a latent browser) and `saepipe compare`
(eval metrics side by side) for evaluated run folders.

runs.py reads run folders; compare.py groups and formats metrics; plots.py draws PNGs; latents.py scans
held-out rows for the latent browser; html.py renders the page; build.py ties them together;
commands.py holds the click commands.
"""
