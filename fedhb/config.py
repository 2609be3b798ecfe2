"""Option groups of ``fedhb fit``.

Each dataclass is one ``--group.*`` block of the command line; jsonargparse turns the attribute docstrings into
``--help``. Every field is checked in ``__post_init__`` and an error names the flag, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

#: Run options that do not change a run's numbers: a run may resume with other values of them, and ``fedhb report``
#: does not tell runs apart by them. Dotted names as on the command line (``data.root`` is the YAML's
#: ``data.init_args.root``); a name covers its sub-options (``checkpoint`` covers ``checkpoint.every``). Precision
#: is not among them: bf16 and fp32 runs differ in their numbers.
RESULT_NEUTRAL = ("out_dir", "overwrite", "resume", "data.root", "data.download", "fabric.accelerator",
                  "fabric.devices", "fabric.num_nodes", "fabric.strategy", "checkpoint", "federation.eval_batch_size",
                  "federation.client_batch", "data.cache", "data.cache_dir")


def is_result_neutral(key: str) -> bool:
    """Whether the dotted option ``key`` (``init_args`` levels allowed) is in :data:`RESULT_NEUTRAL`."""
    key = key.replace(".init_args.", ".")
    return any(key == name or key.startswith(name + ".") for name in RESULT_NEUTRAL)


#: The modalities an encoder exists for (``fedhb.data.base.MODALITIES``, spelled here: the config imports no data code).
ENCODED_MODALITIES = ("image", "text", "signal", "audio", "tabular")


def _check(condition: bool, flag: str, value: object, allowed: str) -> None:
    if not condition:
        raise ValueError(f"--{flag} must be {allowed}, got {value!r}")


@dataclass
class PartitionArgs:
    """How the pooled samples are split over clients, then into each client's train/val/test."""

    scheme: Literal["iid", "dirichlet", "natural"] = "dirichlet"
    """``iid`` (uniform), ``dirichlet`` (label skew with concentration ``alpha``) or ``natural`` (one client per
    value of the dataset's site/patient key, or groups of them when there are more groups than clients)."""
    num_clients: int = 20
    """Number of clients."""
    alpha: float = 0.1
    """Dirichlet concentration; smaller is more skewed (FHBench: 0.1)."""
    min_samples: int = 10
    """Smallest number of samples a client may hold; met by moving samples, never by resampling forever."""
    split: tuple[float, float, float] = (0.4, 0.3, 0.3)
    """Each client's train/val/test fractions, stratified by label (FHBench: 40/30/30)."""
    group_by: str | None = None
    """Keep every sample with the same value of this key (e.g. ``patient``, ``abstract``) on one client and one
    side of the train/test split. ``None`` uses the dataset's own default key, ``none`` disables grouping."""
    natural_by: str | None = None
    """With ``scheme: natural``, the key whose values are the clients when they are not the groups (PadChest's
    ``site``, the scanner manufacturer: one client per site, each patient whole inside one). ``None`` uses the
    dataset's own natural key, or ``group_by`` when it has none; ``none`` always uses ``group_by``."""
    missing_modality: str | None = None
    """Remove this modality (``text``, ``image``, ...) of multimodal data from some clients or samples (see
    ``missing_fraction``, ``missing_level``); seeded, the same on any number of processes."""
    missing_fraction: float = 0.5
    """Fraction of the clients (``missing_level: client``) or of each client's samples (``sample``) that lose
    ``missing_modality``."""
    missing_level: Literal["client", "sample"] = "client"
    """``client``: whole clients lose the modality (a hospital without reports); ``sample``: samples of every
    client do (a study without its report). A sample never loses its last modality."""

    def __post_init__(self) -> None:
        _check(self.scheme in ("iid", "dirichlet", "natural"), "partition.scheme", self.scheme,
               "one of iid, dirichlet, natural")
        _check(0 <= self.missing_fraction <= 1, "partition.missing_fraction", self.missing_fraction, "in [0, 1]")
        _check(self.missing_level in ("client", "sample"), "partition.missing_level", self.missing_level,
               "client or sample")
        _check(self.num_clients >= 1, "partition.num_clients", self.num_clients, ">= 1")
        _check(self.alpha > 0, "partition.alpha", self.alpha, "> 0 (e.g. 0.1 for strong label skew)")
        _check(self.min_samples >= 1, "partition.min_samples", self.min_samples, ">= 1")
        self.split = tuple(float(s) for s in self.split)  # type: ignore[assignment]
        _check(
            len(self.split) == 3 and all(s >= 0 for s in self.split) and abs(sum(self.split) - 1) < 1e-6
            and self.split[0] > 0 and self.split[2] > 0,
            "partition.split", list(self.split), "three non-negative fractions summing to 1 with train and test > 0",
        )


@dataclass
class LoRAArgs:
    """LoRA adapters on the frozen backbone (peft)."""

    r: int = 8
    """Rank of the low-rank update."""
    alpha: float = 16.0
    """Scaling numerator: the update is scaled by ``alpha / r``."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])
    """Modules to adapt. ``query``/``key``/``value`` are resolved to the backbone's own names (``q_proj``, ``q_lin``,
    ...), any other name must exist in the backbone."""

    def __post_init__(self) -> None:
        _check(self.r >= 1, "model.lora.r", self.r, ">= 1")
        _check(self.alpha > 0, "model.lora.alpha", self.alpha, "> 0")
        _check(0 <= self.dropout < 1, "model.lora.dropout", self.dropout, "in [0, 1)")
        _check(len(self.target_modules) > 0, "model.lora.target_modules", self.target_modules, "a non-empty list")


@dataclass
class ModelArgs:
    """The frozen backbone, its LoRA adapters and the trainable classification head."""

    backbone: str = "tiny-vit"
    """A preset name (``tiny-vit``, ...), a Hugging Face hub id (``google/vit-base-patch16-224``) or a local path."""
    backbones: dict[str, str] | None = None
    """Multimodal data: the backbone of each modality, e.g. ``{text: minilm, tabular: mlp, image: tiny-vit}``
    (tabular defaults to ``mlp``). Unimodal data uses ``backbone``."""
    lora: LoRAArgs = field(default_factory=LoRAArgs)
    """LoRA options (the same for every modality's backbone)."""
    head_dropout: float = 0.0
    """Dropout before the classification head."""
    max_length: int = 128
    """Token length for text backbones (ignored by others)."""
    fusion: Literal["concat", "gated"] = "concat"
    """Multimodal data: ``concat`` (Med-MMFL's late fusion: each modality projected to ``fusion_dim``, concatenated,
    a learned placeholder for an absent one) or ``gated`` (gated multimodal units, Arevalo et al. 2017: a learned
    per-feature mix of the present modalities)."""
    fusion_dim: int = 128
    """Multimodal data: width of each modality's projection."""

    def __post_init__(self) -> None:
        _check(bool(self.backbone), "model.backbone", self.backbone, "a preset name, hub id or local path")
        _check(self.fusion in ("concat", "gated"), "model.fusion", self.fusion, "concat or gated")
        _check(self.fusion_dim >= 1, "model.fusion_dim", self.fusion_dim, ">= 1")
        if self.backbones is not None:
            unknown = [m for m in self.backbones if m not in ENCODED_MODALITIES]
            _check(not unknown and all(isinstance(v, str) and v for v in self.backbones.values()),
                   "model.backbones", self.backbones,
                   f"a mapping of modalities ({', '.join(ENCODED_MODALITIES)}) to backbones")
        _check(0 <= self.head_dropout < 1, "model.head_dropout", self.head_dropout, "in [0, 1)")
        _check(self.max_length >= 8, "model.max_length", self.max_length, ">= 8")


@dataclass
class FederationArgs:
    """Rounds, client sampling and local training."""

    rounds: int = 10
    """Number of communication rounds."""
    fraction: float = 1.0
    """Fraction of clients that train in each round (FHBench: 1.0)."""
    local_epochs: int = 1
    """Local epochs per round."""
    batch_size: int = 32
    """Local training batch size."""
    eval_batch_size: int = 256
    """Batch size for evaluation."""
    eval_every: int = 1
    """Evaluate every k rounds (the last round is always evaluated)."""
    eval_protocol: Literal["after_aggregation", "fhbench"] = "after_aggregation"
    """``after_aggregation``: each client's model is tested after it received the server's update.
    ``fhbench``: each client is tested right after local training and reported at its best validation round, as
    FHBench's released code does."""

    dropout: float = 0.0
    """Probability that a selected client fails to report in a round (stragglers, crashes); deterministic under
    ``--seed``."""
    min_clients: int = 1
    """Fewest clients whose updates must arrive for a round to be aggregated."""
    round_retries: int = 2
    """Times a round with fewer than ``min_clients`` reports is retried (with a fresh dropout draw) before the run stops
    with an error."""
    max_loss: float = 1.0e6
    """A client whose mean local loss exceeds this (or is NaN/Inf) has diverged: its update is excluded."""
    client_batch: int = 1
    """Clients of a process that take their local steps together, in one forward and backward pass over their
    stacked batches, each sample through its own client's LoRA factors and head (:mod:`fedhb.batched`); 1 trains one
    client at a time. Algorithms whose local update cannot share a pass (and fp16 loss scaling, multimodal models)
    train one at a time whatever this says. The numbers are those of ``1`` (up to float rounding, without dropout)."""

    def __post_init__(self) -> None:
        _check(self.rounds >= 1, "federation.rounds", self.rounds, ">= 1")
        _check(0 <= self.dropout < 1, "federation.dropout", self.dropout, "in [0, 1)")
        _check(self.min_clients >= 1, "federation.min_clients", self.min_clients, ">= 1")
        _check(self.round_retries >= 0, "federation.round_retries", self.round_retries, ">= 0")
        _check(self.max_loss > 0, "federation.max_loss", self.max_loss, "> 0")
        _check(self.client_batch >= 1, "federation.client_batch", self.client_batch, ">= 1")
        _check(0 < self.fraction <= 1, "federation.fraction", self.fraction, "in (0, 1]")
        _check(self.local_epochs >= 1, "federation.local_epochs", self.local_epochs, ">= 1")
        _check(self.batch_size >= 1, "federation.batch_size", self.batch_size, ">= 1")
        _check(self.eval_batch_size >= 1, "federation.eval_batch_size", self.eval_batch_size, ">= 1")
        _check(self.eval_every >= 1, "federation.eval_every", self.eval_every, ">= 1")
        _check(self.eval_protocol in ("after_aggregation", "fhbench"), "federation.eval_protocol",
               self.eval_protocol, "after_aggregation or fhbench")


@dataclass
class OptimArgs:
    """The local optimizer of every client. Its state is reset when a client starts a round."""

    name: Literal["sgd", "adam", "adamw"] = "sgd"
    """Optimizer."""
    lr: float = 1e-3
    """Learning rate of the first round."""
    momentum: float = 0.0
    """SGD momentum."""
    weight_decay: float = 0.0
    """Weight decay."""
    schedule: Literal["constant", "cosine"] = "cosine"
    """Learning rate over rounds: constant, or cosine from ``lr`` to ``min_lr`` over all rounds (FHBench)."""
    min_lr: float = 1e-6
    """Learning rate of the last round under the cosine schedule."""

    def __post_init__(self) -> None:
        _check(self.name in ("sgd", "adam", "adamw"), "optim.name", self.name, "one of sgd, adam, adamw")
        _check(self.schedule in ("constant", "cosine"), "optim.schedule", self.schedule, "constant or cosine")
        _check(self.lr > 0, "optim.lr", self.lr, "> 0")
        _check(0 <= self.momentum < 1, "optim.momentum", self.momentum, "in [0, 1)")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, ">= 0")
        _check(0 <= self.min_lr <= self.lr, "optim.min_lr", self.min_lr, f"in [0, optim.lr={self.lr}]")


@dataclass
class FabricArgs:
    """Lightning Fabric: where the federation runs. Clients are sharded over the processes."""

    accelerator: str = "auto"
    """``cpu``, ``cuda``, ``gpu``, ``mps`` or ``auto`` (GPUs when present)."""
    devices: int | str = 1
    """Processes per node (one per GPU), or ``auto``."""
    num_nodes: int = 1
    """Number of nodes (SLURM: one task per GPU)."""
    strategy: str = "auto"
    """``auto``, ``ddp`` (re-launches the command per process; use under SLURM or torchrun) or ``ddp_spawn``."""
    precision: str = "32-true"
    """``32-true``, ``bf16-mixed``, ``16-mixed`` (as in Lightning)."""

    def __post_init__(self) -> None:
        allowed = {"auto", "cpu", "cuda", "gpu", "mps"}
        _check(self.accelerator in allowed, "fabric.accelerator", self.accelerator, f"one of {sorted(allowed)}")
        _check(self.devices == "auto" or (isinstance(self.devices, int) and self.devices >= 1), "fabric.devices",
               self.devices, ">= 1 or 'auto'")
        _check(self.num_nodes >= 1, "fabric.num_nodes", self.num_nodes, ">= 1")
        strategies = {"auto", "ddp", "ddp_spawn"}
        _check(self.strategy in strategies, "fabric.strategy", self.strategy, f"one of {sorted(strategies)}")
        precisions = {"32-true", "32", "bf16-mixed", "16-mixed", "64-true"}
        _check(str(self.precision) in precisions, "fabric.precision", self.precision, f"one of {sorted(precisions)}")


@dataclass
class CheckpointArgs:
    """Saving the federation state so that a run can resume."""

    every: int = 0
    """Save every k rounds (0: by time only, see ``minutes``). The last round is always saved, and so is the round a
    run stops after on SIGINT (Ctrl-C) or SIGTERM."""
    minutes: float = 5.0
    """Also save when this many minutes have passed since the last save (0: never by time): a crash loses at most
    about this much work."""
    keep: int = 2
    """Keep the newest N checkpoints."""

    def __post_init__(self) -> None:
        _check(self.every >= 0, "checkpoint.every", self.every, ">= 0")
        _check(self.minutes >= 0, "checkpoint.minutes", self.minutes, ">= 0")
        _check(self.keep >= 1, "checkpoint.keep", self.keep, ">= 1")


@dataclass
class PrivacyArgs:
    """Differential privacy with accounting (see the README's "Privacy" section for what each mode protects).

    ``client``: DP-FedAvg (McMahan et al., arXiv 1710.06963): each client's update (what it uploads minus what it
    received) is clipped to L2 norm ``clip`` and Gaussian noise of std ``noise_multiplier * clip`` is added to the
    sum of the round's updates; ε covers everything a client's data can change (the models every client receives).
    ``sample``: DP-SGD inside each client (Abadi et al., arXiv 1607.00133): per-sample gradients clipped to ``clip``,
    noise ``noise_multiplier * clip`` per step, Poisson-sampled batches; ε per client covers one training sample.
    """

    mode: Literal["none", "client", "sample"] = "none"
    """``none``, ``client`` (client-level DP on the server step) or ``sample`` (sample-level DP-SGD per client)."""
    clip: float = 1.0
    """L2 bound: of each client's update (``client``), of each per-sample gradient (``sample``); with
    ``adaptive_clip`` the starting value."""
    noise_multiplier: float | None = None
    """Noise std divided by ``clip``. Give it or ``target_epsilon``, not both."""
    target_epsilon: float | None = None
    """The ε to reach after ``--federation.rounds``: the noise multiplier is computed for the planned rounds."""
    delta: float = 1e-5
    """The δ of (ε, δ)-DP; keep it below 1 / (number of clients) for ``client``, 1 / (samples) for ``sample``."""
    adaptive_clip: bool = False
    """``client`` only: adapt ``clip`` to the ``target_quantile`` of the update norms (Andrew et al., arXiv
    1905.03871), from a count of unclipped clients noised with std ``max(clients per round / 20, noise_multiplier)``;
    its privacy cost is included in ε (the updates' noise grows to pay for it)."""
    target_quantile: float = 0.5
    """The fraction of updates that adaptive clipping aims to leave unclipped."""
    clip_lr: float = 0.2
    """Adaptive clipping's geometric step ``eta``: ``clip *= exp(-eta * (unclipped fraction - target_quantile))``."""
    accountant: Literal["rdp", "prv"] = "rdp"
    """The privacy accountant (opacus): ``rdp`` (Rényi DP, Mironov et al. 2019) or ``prv`` (privacy random
    variables, Gopi et al. 2021; tighter)."""

    def __post_init__(self) -> None:
        _check(self.mode in ("none", "client", "sample"), "privacy.mode", self.mode, "one of none, client, sample")
        _check(self.clip > 0, "privacy.clip", self.clip, "> 0")
        _check(self.noise_multiplier is None or self.noise_multiplier >= 0, "privacy.noise_multiplier",
               self.noise_multiplier, ">= 0")
        _check(self.target_epsilon is None or self.target_epsilon > 0, "privacy.target_epsilon",
               self.target_epsilon, "> 0")
        _check(0 < self.delta < 1, "privacy.delta", self.delta, "in (0, 1)")
        _check(0 < self.target_quantile < 1, "privacy.target_quantile", self.target_quantile, "in (0, 1)")
        _check(self.clip_lr > 0, "privacy.clip_lr", self.clip_lr, "> 0")
        _check(self.accountant in ("rdp", "prv"), "privacy.accountant", self.accountant, "rdp or prv")
        if self.mode == "none":
            return
        _check(self.noise_multiplier is None or self.target_epsilon is None, "privacy.target_epsilon",
               self.target_epsilon, f"unset when --privacy.noise_multiplier is given ({self.noise_multiplier})")
        _check(self.noise_multiplier is not None or self.target_epsilon is not None, "privacy.noise_multiplier",
               self.noise_multiplier, f"set (or --privacy.target_epsilon) with --privacy.mode {self.mode}")
        _check(not self.adaptive_clip or self.mode == "client", "privacy.adaptive_clip", self.adaptive_clip,
               "false with --privacy.mode sample (adaptive clipping is for client updates)")


@dataclass
class SecureAggregationArgs:
    """Secure aggregation (SecAgg+, Bell et al., arXiv 2009.01471; Bonawitz et al., CCS 2017): the server sees each
    client's upload only masked, and their sum."""

    enabled: bool = False
    """Mask every upload; the server unmasks only the sum."""
    bits: int = 16
    """Fixed-point bits per coordinate of an update in ``[-clip_range, clip_range]``."""
    clip_range: float = 1.0
    """Each coordinate of a client's update is clamped to ``[-clip_range, clip_range]`` before quantisation."""
    threshold: int | None = None
    """Dropped clients per round the protocol recovers from (Shamir shares); one more stops the round. ``None``: the
    largest safe value, ``(clients per round - 1) // 2``."""
    neighbors: int = 0
    """``0``: every pair of clients shares a mask (SecAgg). ``k`` (even): each client masks with ``k`` neighbours on
    a random ring (SecAgg+'s Harary graph), so its cost grows with ``k``, not with the clients per round."""
    max_weight: int = 1000
    """A client's weight in the mean is its training samples, at most this (as Flower's SecAgg+ workflow): the
    weighted sum must fit the ring of masked integers."""
    noise: Literal["server", "distributed"] = "server"
    """With ``--privacy.mode client``: ``server`` adds the noise to the unmasked sum (trusts the server not to look
    before it adds it); ``distributed``: each client adds its share of the noise before masking, so the server never
    sees a sum with less noise than ε needs (clients are then weighted equally)."""

    def __post_init__(self) -> None:
        _check(2 <= self.bits <= 24, "secure_aggregation.bits", self.bits, "in [2, 24]")
        _check(self.clip_range > 0, "secure_aggregation.clip_range", self.clip_range, "> 0")
        _check(self.threshold is None or self.threshold >= 0, "secure_aggregation.threshold", self.threshold,
               ">= 0 or null")
        _check(self.neighbors >= 0 and self.neighbors % 2 == 0, "secure_aggregation.neighbors", self.neighbors,
               "0 (all pairs) or an even number >= 2")
        _check(self.max_weight >= 1, "secure_aggregation.max_weight", self.max_weight, ">= 1")
        _check(self.noise in ("server", "distributed"), "secure_aggregation.noise", self.noise,
               "server or distributed")


@dataclass
class AuditArgs:
    """A measured privacy audit after the run: membership inference against each client's final model."""

    enabled: bool = False
    """Run the audit and write its results to ``summary.json`` (``audit``)."""
    shadows: int = 4
    """Reference models per client for the calibrated attack (LiRA-offline, Carlini et al., arXiv 2112.03570),
    each trained on half of the client's validation split, which holds neither members nor non-members."""
    shadow_epochs: int = 0
    """Local epochs of each reference model; 0: the run's rounds times ``--federation.local_epochs``."""
    max_samples: int = 500
    """Members and non-members scored per client, at most (each drawn without replacement)."""

    def __post_init__(self) -> None:
        _check(self.shadows >= 1, "audit.shadows", self.shadows, ">= 1")
        _check(self.shadow_epochs >= 0, "audit.shadow_epochs", self.shadow_epochs, ">= 0")
        _check(self.max_samples >= 2, "audit.max_samples", self.max_samples, ">= 2")
