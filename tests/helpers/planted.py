"""Ground truth for SAE recipes: activations built from known sparse features (write them as a store
with store_schema.generated.write_array_store; `planted_store` writes the recovery tests' set).

Each row is a sparse non-negative combination of unit "feature" directions plus Gaussian noise; feature
i fires independently with probability `frequencies[i]` (spread log-uniformly, so rare and common
features both exist). An SAE trained right recovers the directions as decoder rows.

`PlantedFeatures.make_hierarchical` adds a two-level hierarchy (for Matryoshka SAEs): child features
fire only on rows where their parent fires, and each child's direction leans towards its parent's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from store_schema.generated import write_array_store


@dataclass(frozen=True)
class PlantedFeatures:
    directions: np.ndarray  # float32 [n_features, d], unit rows
    frequencies: np.ndarray  # float64 [n_features], firing probability per row
    # Hierarchical features only (None: all independent): int64 [n_features], each feature's parent or -1
    # for a top-level one. A child's `frequencies` entry is its firing probability on rows where its
    # parent fires (it never fires otherwise).
    parents: np.ndarray | None = None

    @classmethod
    def make(
        cls, d: int, n_features: int, *, min_freq: float = 0.005, max_freq: float = 0.05, seed: int = 0
    ) -> PlantedFeatures:
        rng = np.random.default_rng(seed)
        directions = rng.standard_normal((n_features, d)).astype(np.float32)
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        frequencies = np.exp(rng.uniform(np.log(min_freq), np.log(max_freq), n_features))
        return cls(directions, frequencies)

    @classmethod
    def make_hierarchical(
        cls,
        d: int,
        n_parents: int,
        children_per_parent: int,
        *,
        min_freq: float = 0.01,
        max_freq: float = 0.1,
        child_freq: float = 0.3,
        parent_share: float = 0.5,
        seed: int = 0,
    ) -> PlantedFeatures:
        """`n_parents` top-level features (frequencies log-uniform in [min_freq, max_freq]), each with
        `children_per_parent` children that fire, each independently with probability `child_freq`, only
        on rows where their parent fires. A child's direction is parent_share·parent + √(1 − parent_share²)·u,
        u a random unit vector orthogonal to the parent: cosine `parent_share` with its parent. Features
        are ordered parents first (0 … n_parents − 1), then the children of parent 0, of parent 1, …"""
        if not 0 <= parent_share < 1:
            raise ValueError(f"parent_share must be in [0, 1), got {parent_share}")
        rng = np.random.default_rng(seed)
        top = rng.standard_normal((n_parents, d))
        top /= np.linalg.norm(top, axis=1, keepdims=True)
        parent_of = np.repeat(np.arange(n_parents), children_per_parent)
        own = rng.standard_normal((len(parent_of), d))
        own -= (own * top[parent_of]).sum(axis=1, keepdims=True) * top[parent_of]
        own /= np.linalg.norm(own, axis=1, keepdims=True)
        children = parent_share * top[parent_of] + np.sqrt(1 - parent_share**2) * own
        directions = np.concatenate([top, children]).astype(np.float32)
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        frequencies = np.concatenate(
            [np.exp(rng.uniform(np.log(min_freq), np.log(max_freq), n_parents)), np.full(len(parent_of), child_freq)]
        )
        return cls(directions, frequencies, np.concatenate([np.full(n_parents, -1), parent_of]).astype(np.int64))

    def sample(self, n: int, *, noise: float = 0.01, seed: int = 1) -> np.ndarray:
        """float32 [n, d] rows; magnitudes of active features uniform in [0.5, 1.5]."""
        return self.sample_with_active(n, noise=noise, seed=seed)[0]

    def sample_with_active(self, n: int, *, noise: float = 0.01, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """`sample`'s rows and which features are active in each (bool [n, n_features])."""
        rng = np.random.default_rng(seed)
        active = rng.random((n, len(self.frequencies))) < self.frequencies
        if self.parents is not None:  # a child fires only where its parent does (parents come first)
            children = np.flatnonzero(self.parents >= 0)
            active[:, children] &= active[:, self.parents[children]]
        magnitudes = rng.uniform(0.5, 1.5, active.shape) * active
        rows = magnitudes.astype(np.float32) @ self.directions
        return rows + noise * rng.standard_normal(rows.shape).astype(np.float32), active

    def recovered_fraction(
        self, decoder_rows: torch.Tensor | np.ndarray, threshold: float = 0.9, features: np.ndarray | None = None
    ) -> float:
        """Share of planted directions (those indexed by `features`, default all) matched by some decoder
        row at cosine >= threshold."""
        dec = torch.as_tensor(decoder_rows, dtype=torch.float32)
        dec = dec / dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        planted = self.directions if features is None else self.directions[features]
        best = (torch.from_numpy(planted) @ dec.T).max(dim=1).values
        return float((best >= threshold).float().mean())


def planted_store(path: Path, n_train: int, n_eval: int) -> tuple[PlantedFeatures, Path]:
    """The recovery tests' ground truth: 64-d rows built from 256 planted features (seed 0), written as a
    complete store at `path` (hook "synthetic": `n_train` training rows drawn with seed 1, `n_eval` eval
    rows with seed 2), and the features."""
    features = PlantedFeatures.make(64, 256, seed=0)
    write_array_store(path, features.sample(n_train, seed=1), features.sample(n_eval, seed=2), hook="synthetic")
    return features, path


@dataclass(frozen=True)
class PlantedTranscoder:
    """Ground truth for transcoders: feature i reads direction `inputs.directions[i]` of the input x and
    writes `out_directions[i]` into the output y, with the same magnitude: x = Σ f_i d_in,i + noise,
    y = Σ f_i d_out,i (+ x·`linear`, the part a skip transcoder's linear path should carry)."""

    inputs: PlantedFeatures
    out_directions: np.ndarray  # float32 [n_features, d_out], unit rows
    linear: np.ndarray | None = None  # float32 [d_in, d_out]

    @classmethod
    def make(cls, d_in: int, d_out: int, n_features: int, *, linear_scale: float = 0.0, seed: int = 0):
        inputs = PlantedFeatures.make(d_in, n_features, seed=seed)
        rng = np.random.default_rng(seed + 1000)
        out = rng.standard_normal((n_features, d_out)).astype(np.float32)
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        linear = None
        if linear_scale:
            linear = (linear_scale * rng.standard_normal((d_in, d_out)) / np.sqrt(d_in)).astype(np.float32)
        return cls(inputs, out, linear)

    def sample(self, n: int, *, noise: float = 0.01, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(x [n, d_in], y [n, d_out]) float32."""
        rng = np.random.default_rng(seed)
        active = rng.random((n, len(self.inputs.frequencies))) < self.inputs.frequencies
        magnitudes = (rng.uniform(0.5, 1.5, active.shape) * active).astype(np.float32)
        x = magnitudes @ self.inputs.directions + noise * rng.standard_normal((n, self.inputs.directions.shape[1]))
        y = magnitudes @ self.out_directions
        if self.linear is not None:
            y = y + x @ self.linear
        return x.astype(np.float32), y.astype(np.float32)

    def recovered_fraction(self, decoder_rows, threshold: float = 0.9) -> float:
        """Share of the planted output directions matched by some decoder row at cosine >= threshold."""
        return PlantedFeatures(self.out_directions, self.inputs.frequencies).recovered_fraction(decoder_rows, threshold)


def planted_transcoder_store(
    path: Path, n_train: int, n_eval: int, noise: float = 0.01, **make
) -> tuple[PlantedTranscoder, Path]:
    """A complete store of hooks "in" (64 wide) and "out" (48 wide), row-aligned pairs from 256 planted
    features (seed 0; training pairs drawn with seed 1, eval pairs with seed 2). `noise`: the dense
    Gaussian part of x (per dimension), which only a linear path can carry into y."""
    truth = PlantedTranscoder.make(64, 48, 256, **make)
    (x, y), (x_eval, y_eval) = truth.sample(n_train, noise=noise, seed=1), truth.sample(n_eval, noise=noise, seed=2)
    write_array_store(path, {"in": x, "out": y}, {"in": x_eval, "out": y_eval})
    return truth, path


@dataclass(frozen=True)
class PlantedCLT:
    """Ground truth for cross-layer transcoders over `n_layers` layers: feature i belongs to layer
    `source[i]`, reads direction `in_directions[i]` of that layer's input, and writes into that layer's output
    and the next ones: `out_rows[i]` holds its writes into layers source[i] .. L − 1 side by side (zero past
    its last layer), so its planted decoder row is out_rows[i][source[i] · d:]."""

    source: np.ndarray  # int64 [n_features]
    in_directions: np.ndarray  # float32 [n_features, d], unit rows
    out_rows: np.ndarray  # float32 [n_features, n_layers · d]; the part from source[i] on has unit norm
    frequencies: np.ndarray
    n_layers: int
    d: int

    @classmethod
    def make(cls, n_layers: int, d: int, per_layer: int, *, seed: int = 0) -> PlantedCLT:
        """`per_layer` features read each layer; each writes into 1 to 3 consecutive layers from its own."""
        base = PlantedFeatures.make(d, n_layers * per_layer, seed=seed)
        rng = np.random.default_rng(seed + 2000)
        source = np.repeat(np.arange(n_layers), per_layer)
        out = np.zeros((len(source), n_layers * d), np.float32)
        for i, layer in enumerate(source):
            last = min(n_layers - 1, layer + int(rng.integers(0, 3)))
            row = rng.standard_normal((last - layer + 1) * d).astype(np.float32)
            out[i, layer * d : (last + 1) * d] = row / np.linalg.norm(row)
        return cls(source, base.directions, out, base.frequencies, n_layers, d)

    def sample(self, n: int, *, noise: float = 0.01, seed: int = 1) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(each layer's inputs, each layer's outputs), float32 [n, d] each."""
        rng = np.random.default_rng(seed)
        active = rng.random((n, len(self.frequencies))) < self.frequencies
        magnitudes = (rng.uniform(0.5, 1.5, active.shape) * active).astype(np.float32)
        xs = []
        for layer in range(self.n_layers):
            mine = self.source == layer
            x = magnitudes[:, mine] @ self.in_directions[mine]
            xs.append((x + noise * rng.standard_normal(x.shape)).astype(np.float32))
        y = magnitudes @ self.out_rows
        return xs, [part.astype(np.float32) for part in np.split(y, self.n_layers, axis=1)]

    def recovered_fraction(self, layer: int, decoder_rows, threshold: float = 0.9) -> float:
        """Share of layer `layer`'s planted features matched by a row of its decoder [width, (L − layer) · d]."""
        mine = self.source == layer
        planted = PlantedFeatures(self.out_rows[mine, layer * self.d :], self.frequencies[mine])
        return planted.recovered_fraction(decoder_rows, threshold)


def planted_clt_store(path: Path, n_train: int, n_eval: int, n_layers: int = 3) -> tuple[PlantedCLT, Path]:
    """A complete store of blocks.L.mlp.hook_in and blocks.L.hook_mlp_out for L < n_layers (32 wide), from
    96 planted features per layer (seed 0; training rows drawn with seed 1, eval rows with seed 2)."""
    truth = PlantedCLT.make(n_layers, 32, 96)
    splits = []
    for n, seed in ((n_train, 1), (n_eval, 2)):
        xs, ys = truth.sample(n, seed=seed)
        rows = {f"blocks.{layer}.mlp.hook_in": x for layer, x in enumerate(xs)}
        splits.append(rows | {f"blocks.{layer}.hook_mlp_out": y for layer, y in enumerate(ys)})
    write_array_store(path, *splits)
    return truth, path


def planted_crosscoder_store(path: Path, n_train: int, n_eval: int) -> tuple[PlantedFeatures, Path]:
    """A complete store of hooks "a" and "b" (32 wide each) whose rows side by side are built from 256
    planted features over the 64 joined dimensions (seed 0): 3 in 4 write into both hooks, the rest into
    one hook only (zero in the other), as a feature one model or layer has and the other lacks."""
    shared = PlantedFeatures.make(64, 256, seed=0)
    directions = shared.directions.copy()
    only = np.arange(len(directions)) % 4 == 3
    directions[only & (np.arange(len(directions)) % 8 == 3), 32:] = 0  # only in "a"
    directions[only & (np.arange(len(directions)) % 8 == 7), :32] = 0  # only in "b"
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    truth = PlantedFeatures(directions, shared.frequencies)
    train, held_out = truth.sample(n_train, seed=1), truth.sample(n_eval, seed=2)
    write_array_store(path, {"a": train[:, :32], "b": train[:, 32:]}, {"a": held_out[:, :32], "b": held_out[:, 32:]})
    return truth, path
