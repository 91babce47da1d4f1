"""What every stage shares: user-facing errors, the torch device, torch.distributed, run folders."""
