"""One typed configuration tree for every bavq entry point.

YAML files set fields of these dataclasses, the command line adds ``key.sub=value`` overrides,
and :meth:`Config.validate` rejects out-of-range values. Every problem is raised as a
:class:`ConfigError` whose message is one line naming the offending key, so entry points can print
it and exit with code 2 instead of a traceback.

OmegaConf structured configs do the merging and the type checks (unknown keys, wrong types). Each
section's ``validate()`` holds the range rules OmegaConf cannot express (the quantizer's live in
:mod:`bavq.quantizers.checks`, which the quantizer constructors call too).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bavq.rules import QUANTIZERS, ConfigError, check, one_of  # noqa: F401 (re-exported)

# omegaconf is imported inside the functions that merge configs, so the dataclasses (and with them
# bavq.models / bavq.quantizers) import on machines without it, e.g. the bare GPU benchmark box.

ARCHS = ("vqvae", "vqgan")
DATA_SOURCES = ("fashion_mnist", "cifar10", "image_folder", "hf", "shards")
PRECISIONS = ("no", "bf16", "fp16")
BACKENDS = ("ddp", "deepspeed")


@dataclass
class QuantizerConfig:
    name: str = "vq_ema"  # "vq_ema" (baseline) or "ba_vq" (Blahut-Arimoto codebook)
    num_codes: int = 512  # codebook size K
    code_dim: int = 64  # dimension D of each code; the encoder emits exactly this many channels
    decay: float = 0.99  # EMA decay gamma of the codebook statistics, in [0, 1)
    eps: float = 1e-5  # Laplace smoothing of the VQ-EMA counts
    commitment: float = 0.25  # weight of the commitment loss mean ||z - sg(e)||^2
    chunk_size: int = 8192  # most rows per distance chunk (also capped by chunk_budget_mib)
    chunk_budget_mib: int = 128  # memory budget of one (chunk x K) fp32 matrix, in MiB
    # "random" (Gaussian codes) or "data" (codes from the first global batch; when K exceeds its
    # rows, repeated draws get noise of 0.1 x the data's per-dimension std, so codes are distinct)
    init: str = "random"
    dead_code_threshold: float = 0.0  # restart codes whose EMA count falls below this; 0 = off
    # the threshold is a fraction of the mean EMA count (tokens per update / K) instead of a count:
    # the same rule at any K and batch (at K = 16,384 and 3,136 tokens a count of 0.5 kills most codes)
    dead_code_relative: bool = False
    l2_normalize: bool = False  # put inputs and codes on the unit sphere before quantizing
    # BA-VQ only:
    # "anneal" (hot start measured on the first batch, slow cooling to a hard end), "fixed"
    # (beta_start -> beta_end) or "adaptive" (c*D / 2*D_hat)
    beta_mode: str = "anneal"
    beta_start: float = 1.0  # fixed mode: inverse temperature at step 0
    beta_end: float = 100.0  # fixed mode: inverse temperature after beta_anneal_steps (geometric)
    beta_anneal_steps: int = 10000  # steps of the geometric anneal (of beta or of c)
    adaptive_c_start: float = 2.0  # adaptive mode: c at step 0 (beta = c * D / (2 * D_hat))
    adaptive_c_end: float = 64.0  # adaptive mode: c after beta_anneal_steps (geometric)
    max_beta_growth: float = 0.001  # adaptive mode: beta grows by at most this factor per step
    entropy_weight: float = 1.0  # lambda: 0 textbook BA, 1 uniform prior, >1 spreads usage
    prior_floor: float = 0.1  # alpha: the prior mixes in alpha/K of the uniform distribution
    assign: str = "nearest"  # hard code: "nearest" (argmin distance) or "map" (argmax posterior)
    entropy_loss_weight: float = 0.0  # weight of the (mean H(p|x) - H(mean p)) loss; 0 = off
    anneal_start_nats: float = 4.0  # anneal mode: beta_0 * (largest code gap or mean min distance of batch 1)
    anneal_end_nats: float = 32.0  # anneal mode: cold end, beta * D_hat (D_hat = EMA of mean min distance)
    anneal_rate: float = 0.5  # anneal mode: beta grows by at most anneal_rate * (1 - decay) per step, in (0, 1]
    estep: str = "balanced"  # "softmax" (p ~ q^(1-lambda) exp(-beta d)) or "balanced" (Sinkhorn, columns n*r)
    balance_iters: int = 3  # balanced E-step: Sinkhorn iterations per step; 0 = online (needs balance_warm_start)
    balance_target: str = "uniform"  # balanced E-step: column marginal r, "uniform" (1/K) or "prior" (q)
    balance_warm_start: bool = False  # balanced E-step: start from the last step's potentials (in checkpoints)
    balance_beta_scale: bool = False  # warm start: rescale the carried potentials by beta_now / beta_then
    # restarts: "soft" (dead = low EMA of the E-step's soft counts, which the balanced E-step keeps near
    # uniform) or "hard" (low EMA of the hard codes' counts, as VQ-EMA; see README "Results")
    restart_counts: str = "soft"

    def validate(self) -> QuantizerConfig:
        """Every field's rule, whatever ``name``; the rules live with the quantizers, whose
        constructors apply them too."""
        from bavq.quantizers import checks  # bavq.quantizers imports this module

        checks.check_name(self.name)
        checks.check_codebook_args(self)
        checks.check_ba_vq_args(self)
        return self


@dataclass
class ModelConfig:
    arch: str = "vqvae"  # "vqvae" (small conv, 32x32, f4) or "vqgan" (taming-style)
    in_channels: int = 3  # image channels
    base_channels: int = 64  # width of the first stage
    channel_mult: list[int] = field(default_factory=lambda: [1, 2])  # width multiplier per stage
    num_res_blocks: int = 2  # residual blocks per stage
    attn_resolutions: list[int] = field(default_factory=list)  # vqgan: resolutions with attention
    dropout: float = 0.0  # dropout inside residual blocks
    # discriminator (used when loss.disc_weight > 0)
    disc_channels: int = 64  # width of the PatchGAN's first layer
    disc_layers: int = 3  # number of strided layers of the PatchGAN

    def validate(self) -> ModelConfig:
        one_of(self.arch, "model.arch", ARCHS)
        check(self.in_channels in (1, 3), "model.in_channels", f"must be 1 or 3, got {self.in_channels}")
        check(self.base_channels >= 8, "model.base_channels", "must be >= 8")
        check(len(self.channel_mult) >= 1 and all(c >= 1 for c in self.channel_mult), "model.channel_mult",
              "must be a non-empty list of positive integers")
        check(self.num_res_blocks >= 0, "model.num_res_blocks", "must be >= 0")
        check(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")
        check(self.disc_layers >= 1, "model.disc_layers", "must be >= 1")
        return self


@dataclass
class LossConfig:
    reconstruction: str = "l1"  # "l1" or "l2" pixel loss
    perceptual_weight: float = 0.0  # LPIPS weight; > 0 needs lpips_weights
    lpips_weights: str = ""  # local path of the LPIPS (VGG16 + linear heads) weights file
    disc_weight: float = 0.0  # GAN loss weight; 0 disables the discriminator
    disc_start: int = 0  # generator step at which the GAN loss and the discriminator start
    adaptive_disc_weight: bool = True  # taming's gradient-norm balanced GAN weight

    def validate(self) -> LossConfig:
        one_of(self.reconstruction, "loss.reconstruction", ("l1", "l2"))
        check(self.perceptual_weight >= 0, "loss.perceptual_weight", "must be >= 0")
        check(self.perceptual_weight == 0 or bool(self.lpips_weights), "loss.lpips_weights",
              "loss.perceptual_weight > 0 needs a local LPIPS weights file in loss.lpips_weights")
        check(self.disc_weight >= 0, "loss.disc_weight", "must be >= 0")
        check(self.disc_start >= 0, "loss.disc_start", "must be >= 0")
        return self


@dataclass
class DataConfig:
    source: str = "cifar10"  # cifar10 | fashion_mnist | image_folder | hf | shards
    # dataset folder; empty = the source's default, $BAVQ_DATA/SOURCE (BAVQ_DATA defaults to
    # ~/.cache/bavq; fashion_mnist first looks in Debian's /usr/share/datasets/fashion-mnist)
    root: str = ""
    download: bool = True  # allow torchvision / HF downloads where the network permits
    train_shards: str = ""  # shards: brace pattern or pipe:/fsspec URL of training shards
    val_shards: str = ""  # shards: pattern of validation shards
    hf_name: str = ""  # hf: hub name or local load_from_disk folder
    hf_image_key: str = "image"  # hf: column holding the image
    image_size: int = 32  # training resolution (square)
    channels: int = 3  # 1 or 3; grayscale sources are repeated to 3 channels when 3
    val_fraction: float = 0.1  # held-out fraction for sources without a validation split
    train_limit: int = 0  # use at most this many training images (0 = all)
    val_limit: int = 0  # evaluate on at most this many held-out images (0 = all)
    random_flip: bool = False  # horizontal flips in training
    random_crop_scale: float = 1.0  # lower scale of random-resized-crop; 1.0 = center crop only
    num_workers: int = 2  # DataLoader workers per rank
    shuffle_buffer: int = 2000  # shards: shuffle buffer size in samples
    train_num_samples: int = 0  # shards: training set size when no sizes.json is readable (pipe: URLs)

    def validate(self) -> DataConfig:
        one_of(self.source, "data.source", DATA_SOURCES)
        check(self.source != "shards" or bool(self.train_shards), "data.train_shards",
              "data.source=shards needs data.train_shards (e.g. /data/train-{000000..000099}.tar)")
        check(self.source != "image_folder" or bool(self.root), "data.root",
              "data.source=image_folder needs data.root (a folder of class sub-folders)")
        check(self.source != "hf" or bool(self.hf_name), "data.hf_name", "data.source=hf needs data.hf_name")
        check(self.image_size >= 8, "data.image_size", f"must be >= 8, got {self.image_size}")
        check(self.channels in (1, 3), "data.channels", f"must be 1 or 3, got {self.channels}")
        check(0.0 < self.val_fraction < 1.0, "data.val_fraction", "must be in (0, 1)")
        check(self.train_limit >= 0 and self.val_limit >= 0, "data.train_limit", "limits must be >= 0")
        check(0.0 < self.random_crop_scale <= 1.0, "data.random_crop_scale", "must be in (0, 1]")
        check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        check(self.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0")
        check(self.train_num_samples >= 0, "data.train_num_samples", "must be >= 0")
        return self


@dataclass
class TrainConfig:
    seed: int = 0  # seed for models, codebook init and data order
    batch_size: int = 128  # images per rank per micro-step
    epochs: float = 0.0  # training length in epochs of the training set (used when max_steps = 0)
    max_steps: int = 0  # training length in optimizer steps; overrides epochs when > 0
    lr: float = 2e-4  # peak learning rate of the generator (encoder, decoder)
    disc_lr: float = 2e-4  # peak learning rate of the discriminator
    adam_betas: list[float] = field(default_factory=lambda: [0.5, 0.9])  # Adam betas
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 0  # linear warm-up steps
    lr_schedule: str = "cosine"  # "cosine" or "constant" after the warm-up
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of the peak lr
    grad_accum: int = 1  # micro-steps per optimizer step
    grad_clip: float = 1.0  # max gradient norm; 0 = off (DeepSpeed: from its JSON)
    mixed_precision: str = "no"  # "no", "bf16" or "fp16"; codebook math stays fp32 regardless
    backend: str = "ddp"  # "ddp" (Accelerate) or "deepspeed" (ZeRO-2 through Accelerate)
    deepspeed_config: str = ""  # DeepSpeed JSON of the generator engine; empty = built-in ZeRO-2 defaults
    deepspeed_disc_config: str = ""  # DeepSpeed JSON of the discriminator engine; empty = deepspeed_config
    ema_decay: float = 0.0  # EMA of the weights (timm ModelEmaV3); 0 = off
    # torch.compile the encoder and decoder (never the quantizer: its codebook math stays fp32 and eager)
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile backend when compile=true (e.g. aot_eager: no C++ build)
    log_every: int = 50  # steps between training logs
    eval_every: int = 0  # steps between held-out evaluations; 0 = only at the end
    save_every: int = 0  # steps between checkpoints; 0 = only at the end and on preemption
    keep_last: int = 2  # checkpoints kept besides the every-keep_every ones
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this; 0 = off
    resume: str = "auto"  # "auto" (latest if any), "none", or a checkpoint folder
    stop_at_step: int = 0  # end this job (checkpoint, exit 0) at this global step; a rerun resumes. 0 = off
    check_codebook_sync: bool = True  # compare a codebook checksum across ranks at each log step
    collective_timeout_s: float = 300.0  # process-group timeout (s): the last-resort bound on a hung collective
    heartbeat_timeout_s: float = 60.0  # a rank silent this long (s) is declared dead, all ranks stop; 0 = off
    lock_wait_s: float = 15.0  # wait this long (s) for a live holder of the run folder's lock before refusing
    output_dir: str = "experiments"  # runs go to output_dir/name
    name: str = "run"  # run name

    def validate(self) -> TrainConfig:
        check(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.epochs >= 0, "train.epochs", "must be >= 0")
        check(self.max_steps >= 0, "train.max_steps", "must be >= 0")
        check(self.epochs > 0 or self.max_steps > 0, "train.max_steps",
              "set train.max_steps or train.epochs (--epochs) to a positive value")
        check(self.lr > 0 and self.disc_lr > 0, "train.lr", "learning rates must be > 0")
        check(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), "train.adam_betas",
              "must be two numbers in [0, 1)")
        check(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        one_of(self.lr_schedule, "train.lr_schedule", ("cosine", "constant"))
        check(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
        check(self.grad_accum >= 1, "train.grad_accum", "must be >= 1")
        check(self.grad_clip >= 0, "train.grad_clip", "must be >= 0")
        if self.mixed_precision == "False":  # YAML 1.1 reads a bare `no` (train.mixed_precision=no) as false
            self.mixed_precision = "no"
        one_of(self.mixed_precision, "train.mixed_precision", PRECISIONS)
        one_of(self.backend, "train.backend", BACKENDS)
        check(self.collective_timeout_s > 0, "train.collective_timeout_s", "must be > 0 (seconds)")
        check(self.heartbeat_timeout_s >= 0 and self.lock_wait_s >= 0, "train.heartbeat_timeout_s",
              "heartbeat_timeout_s and lock_wait_s must be >= 0 (seconds)")
        check(0 <= self.ema_decay < 1, "train.ema_decay", "must be in [0, 1)")
        check(self.log_every >= 1, "train.log_every", "must be >= 1")
        for key in ("eval_every", "save_every", "keep_every"):
            check(getattr(self, key) >= 0, f"train.{key}", "must be >= 0")
        check(self.keep_last >= 1, "train.keep_last", "must be >= 1")
        check(self.stop_at_step >= 0, "train.stop_at_step", "must be >= 0")
        check(bool(self.name) and "/" not in self.name, "train.name", "must be a non-empty name without '/'")
        check(bool(self.compile_backend), "train.compile_backend", "must name a torch.compile backend")
        return self


@dataclass
class LogConfig:
    wandb: bool = True  # log to W&B (online when logged in; WANDB_MODE=offline works too)
    wandb_project: str = "bavq"  # W&B project
    tensorboard: bool = True  # write TensorBoard event files under the run folder
    progress: bool = True  # progress on the main process: a bar on a terminal, a plain line every 30 s in logs
    usage_window: int = 65536  # tokens in the sliding window of the training usage metric

    def validate(self) -> LogConfig:
        check(self.usage_window >= 1, "log.usage_window", "must be >= 1")
        return self


@dataclass
class EvalConfig:
    batch_size: int = 256  # images per rank during evaluation
    inception_weights: str = ""  # local pt_inception-2015-12-05-6726825d.pth for rFID; empty = rFID is null
    inception_input_size: int = 299  # Inception input side; 299 = standard FID (smaller: fast tests only)
    num_recon_images: int = 16  # images saved in the reconstruction grid
    precision: str = "fp32"  # "fp32" or "bf16" (autocast over fp32 weights); codebook math stays fp32

    def validate(self) -> EvalConfig:
        check(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        one_of(self.precision, "eval.precision", ("fp32", "bf16"))
        check(self.inception_input_size >= 75, "eval.inception_input_size", "Inception needs >= 75 pixels")
        return self


@dataclass
class Config:
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> Config:
        """Range and choice checks OmegaConf's types cannot express: each section's own, then the one
        rule that spans two sections. Raises ConfigError."""
        for section in (self.quantizer, self.model, self.loss, self.data, self.train, self.log, self.eval):
            section.validate()
        check(self.data.channels == self.model.in_channels, "data.channels",
              f"is {self.data.channels} but model.in_channels is {self.model.in_channels}; set both alike")
        return self


def _one_line(exc) -> str:
    msg = str(exc).strip().splitlines()[0]
    key = getattr(exc, "full_key", None)
    return f"config key '{key}': {msg}" if key else f"config: {msg}"


# Keys older versions wrote into every saved config.yaml, with the one value they could hold. A saved
# run (checkpoint, export) keeps loading; any other value is an error naming the key.
RETIRED_KEYS = {("loss", "disc_loss"): "hinge"}


def _drop_retired(data) -> None:
    """Remove retired keys (in place) from a loaded DictConfig, refusing values that were never valid."""
    from omegaconf import DictConfig

    for (section, key), only_value in RETIRED_KEYS.items():
        group = data.get(section)
        if not isinstance(group, DictConfig) or key not in group:
            continue
        if group[key] != only_value:
            raise ConfigError(f"config key '{section}.{key}': was removed (only '{only_value}' was ever "
                              f"supported); delete it")
        group.pop(key)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at ``path``, then ``key.sub=value`` overrides; validated."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    base = OmegaConf.structured(Config)
    try:
        if path:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file '{path}' does not exist")
            loaded = OmegaConf.load(path)
            if not isinstance(loaded, DictConfig):
                raise ConfigError(f"config file '{path}' must hold a mapping of sections")
            _drop_retired(loaded)
            base = OmegaConf.merge(base, loaded)
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override '{item}' must look like key.sub=value")
        if overrides:
            base = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
        cfg: Config = OmegaConf.to_object(base)
    except OmegaConfBaseException as exc:
        raise ConfigError(_one_line(exc)) from None
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"config file '{path}' is not valid YAML: {detail}") from None
    except OSError as exc:  # OmegaConf raises IOError for a YAML scalar or list at the top
        raise ConfigError(f"config file '{path}' must hold a mapping of sections ({exc})") from None
    return cfg.validate()


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (for checkpoints, trackers, JSON)."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any]) -> Config:
    """Inverse of :func:`to_dict`, with the same key and type checks as a YAML file."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        loaded = OmegaConf.create(data)
        _drop_retired(loaded)
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), loaded))
    except OmegaConfBaseException as exc:
        raise ConfigError(_one_line(exc)) from None
    return cfg.validate()


def to_yaml(cfg: Config) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically: temp file then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(path)


SECTIONS = {"quantizer": QuantizerConfig, "model": ModelConfig, "loss": LossConfig, "data": DataConfig,
            "train": TrainConfig, "log": LogConfig, "eval": EvalConfig}


def field_docs() -> dict[str, tuple[str, str]]:
    """{'section.key': (default, doc)} from the one-line comments in this file (the single source of
    the configuration reference in the README: ``python -m bavq.config``)."""
    import inspect
    import re

    docs = {}
    for section, cls in SECTIONS.items():
        source = inspect.getsource(cls)
        pending = []
        for line in source.splitlines()[1:]:
            stripped = line.strip()
            if stripped.startswith("def "):  # the fields come first; methods follow
                break
            if stripped.startswith("#"):
                pending.append(stripped.lstrip("# ").strip())
                continue
            m = re.match(r"(\w+): [^=]+= (.+?)(?:\s+#\s*(.*))?$", stripped)
            if m:
                default = m.group(2)
                factory = re.match(r"field\(default_factory=lambda: (.+)\)$", default)
                default = factory.group(1) if factory else ("[]" if "default_factory=list" in default else default)
                doc = " ".join(pending + ([m.group(3)] if m.group(3) else []))
                docs[f"{section}.{m.group(1)}"] = (default, doc)
            pending = []
    return docs


def markdown_reference() -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, (default, doc) in field_docs().items():
        lines.append(f"| `{key}` | `{default}` | {doc} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_reference())
