"""One typed configuration tree for every bavq entry point.

YAML files set fields of these dataclasses, the command line adds ``key.sub=value`` overrides,
and :func:`validate` rejects out-of-range values. Every problem is raised as a
:class:`ConfigError` whose message is one line naming the offending key, so entry points can print
it and exit with code 2 instead of a traceback.

OmegaConf structured configs do the merging and the type checks (unknown keys, wrong types);
range checks that OmegaConf cannot express live in :func:`validate`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# omegaconf is imported inside the functions that merge configs, so the dataclasses (and with them
# bavq.models / bavq.quantizers) import on machines without it, e.g. the bare GPU benchmark box.

QUANTIZERS = ("vq_ema", "ba_vq")
ARCHS = ("vqvae", "vqgan")
DATA_SOURCES = ("fashion_mnist", "cifar10", "image_folder", "hf", "shards")
PRECISIONS = ("no", "bf16", "fp16")
BACKENDS = ("ddp", "deepspeed")


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message is one line naming the key."""


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
    anneal_start_nats: float = 1.0  # anneal mode: beta_0 * (largest code gap or mean min distance of batch 1)
    anneal_end_nats: float = 32.0  # anneal mode: cold end, beta * D_hat (D_hat = EMA of mean min distance)
    anneal_rate: float = 0.5  # anneal mode: beta grows by at most anneal_rate * (1 - decay) per step, in (0, 1]
    estep: str = "softmax"  # "softmax" (p ~ q^(1-lambda) exp(-beta d)) or "balanced" (Sinkhorn, columns n*r)
    balance_iters: int = 3  # balanced E-step: log-domain Sinkhorn iterations per step
    balance_target: str = "uniform"  # balanced E-step: column marginal r, "uniform" (1/K) or "prior" (q)


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


@dataclass
class LossConfig:
    reconstruction: str = "l1"  # "l1" or "l2" pixel loss
    perceptual_weight: float = 0.0  # LPIPS weight; > 0 needs lpips_weights
    lpips_weights: str = ""  # local path of the LPIPS (VGG16 + linear heads) weights file
    disc_weight: float = 0.0  # GAN loss weight; 0 disables the discriminator
    disc_start: int = 0  # generator step at which the GAN loss and the discriminator start
    adaptive_disc_weight: bool = True  # taming's gradient-norm balanced GAN weight
    disc_loss: str = "hinge"  # "hinge" (only hinge is supported)


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


@dataclass
class LogConfig:
    wandb: bool = True  # log to W&B (online when logged in; WANDB_MODE=offline works too)
    wandb_project: str = "bavq"  # W&B project
    tensorboard: bool = True  # write TensorBoard event files under the run folder
    progress: bool = True  # progress on the main process: a bar on a terminal, a plain line every 30 s in logs
    usage_window: int = 65536  # tokens in the sliding window of the training usage metric


@dataclass
class EvalConfig:
    batch_size: int = 256  # images per rank during evaluation
    inception_weights: str = ""  # local pt_inception-2015-12-05-6726825d.pth for rFID; empty = rFID is null
    inception_input_size: int = 299  # Inception input side; 299 = standard FID (smaller: fast tests only)
    num_recon_images: int = 16  # images saved in the reconstruction grid
    precision: str = "fp32"  # "fp32" or "bf16" (autocast over fp32 weights); codebook math stays fp32


@dataclass
class Config:
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _one_line(exc) -> str:
    msg = str(exc).strip().splitlines()[0]
    key = getattr(exc, "full_key", None)
    return f"config key '{key}': {msg}" if key else f"config: {msg}"


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
    validate(cfg)
    return cfg


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {msg}")


def _one_of(value: str, key: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, key, f"'{value}' is not one of {', '.join(choices)}")


def validate(cfg: Config) -> Config:
    """Range and choice checks OmegaConf's types cannot express. Raises ConfigError."""
    q, m, lo, d, t = cfg.quantizer, cfg.model, cfg.loss, cfg.data, cfg.train
    _one_of(q.name, "quantizer.name", QUANTIZERS)
    _check(q.num_codes >= 2, "quantizer.num_codes", f"must be >= 2, got {q.num_codes}")
    _check(q.code_dim >= 1, "quantizer.code_dim", f"must be >= 1, got {q.code_dim}")
    _check(0.0 <= q.decay < 1.0, "quantizer.decay", f"must be in [0, 1), got {q.decay}")
    _check(q.eps > 0, "quantizer.eps", f"must be > 0, got {q.eps}")
    _check(q.commitment >= 0, "quantizer.commitment", f"must be >= 0, got {q.commitment}")
    _check(q.chunk_size > 0, "quantizer.chunk_size", f"must be > 0, got {q.chunk_size}")
    _check(q.chunk_budget_mib > 0, "quantizer.chunk_budget_mib", f"must be > 0, got {q.chunk_budget_mib}")
    _one_of(q.init, "quantizer.init", ("random", "data"))
    _check(q.dead_code_threshold >= 0, "quantizer.dead_code_threshold", "must be >= 0")
    _one_of(q.beta_mode, "quantizer.beta_mode", ("anneal", "adaptive", "fixed"))
    for key in ("beta_start", "beta_end", "adaptive_c_start", "adaptive_c_end"):
        _check(getattr(q, key) > 0, f"quantizer.{key}", f"must be > 0, got {getattr(q, key)}")
    _check(q.beta_anneal_steps >= 0, "quantizer.beta_anneal_steps", "must be >= 0")
    _check(q.max_beta_growth > 0, "quantizer.max_beta_growth", "must be > 0")
    _check(q.entropy_weight >= 0, "quantizer.entropy_weight", "must be >= 0")
    _check(q.prior_floor > 0, "quantizer.prior_floor", f"must be > 0, got {q.prior_floor}")
    _one_of(q.assign, "quantizer.assign", ("nearest", "map"))
    _check(q.entropy_loss_weight >= 0, "quantizer.entropy_loss_weight", "must be >= 0")
    _check(q.anneal_start_nats > 0, "quantizer.anneal_start_nats", f"must be > 0, got {q.anneal_start_nats}")
    _check(q.anneal_end_nats > q.anneal_start_nats, "quantizer.anneal_end_nats",
           f"must be > quantizer.anneal_start_nats ({q.anneal_start_nats}), got {q.anneal_end_nats}")
    _check(0 < q.anneal_rate <= 1, "quantizer.anneal_rate", f"must be in (0, 1], got {q.anneal_rate}")
    _one_of(q.estep, "quantizer.estep", ("softmax", "balanced"))
    _check(q.balance_iters >= 1, "quantizer.balance_iters", f"must be >= 1, got {q.balance_iters}")
    _one_of(q.balance_target, "quantizer.balance_target", ("uniform", "prior"))

    _one_of(m.arch, "model.arch", ARCHS)
    _check(m.in_channels in (1, 3), "model.in_channels", f"must be 1 or 3, got {m.in_channels}")
    _check(m.base_channels >= 8, "model.base_channels", "must be >= 8")
    _check(len(m.channel_mult) >= 1 and all(c >= 1 for c in m.channel_mult), "model.channel_mult",
           "must be a non-empty list of positive integers")
    _check(m.num_res_blocks >= 0, "model.num_res_blocks", "must be >= 0")
    _check(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)")
    _check(m.disc_layers >= 1, "model.disc_layers", "must be >= 1")

    _one_of(lo.reconstruction, "loss.reconstruction", ("l1", "l2"))
    _one_of(lo.disc_loss, "loss.disc_loss", ("hinge",))
    _check(lo.perceptual_weight >= 0, "loss.perceptual_weight", "must be >= 0")
    _check(lo.perceptual_weight == 0 or bool(lo.lpips_weights), "loss.lpips_weights",
           "loss.perceptual_weight > 0 needs a local LPIPS weights file in loss.lpips_weights")
    _check(lo.disc_weight >= 0, "loss.disc_weight", "must be >= 0")
    _check(lo.disc_start >= 0, "loss.disc_start", "must be >= 0")

    _one_of(d.source, "data.source", DATA_SOURCES)
    _check(d.source != "shards" or bool(d.train_shards), "data.train_shards",
           "data.source=shards needs data.train_shards (e.g. /data/train-{000000..000099}.tar)")
    _check(d.source != "image_folder" or bool(d.root), "data.root",
           "data.source=image_folder needs data.root (a folder of class sub-folders)")
    _check(d.source != "hf" or bool(d.hf_name), "data.hf_name", "data.source=hf needs data.hf_name")
    _check(d.image_size >= 8, "data.image_size", f"must be >= 8, got {d.image_size}")
    _check(d.channels in (1, 3), "data.channels", f"must be 1 or 3, got {d.channels}")
    _check(d.channels == m.in_channels, "data.channels",
           f"is {d.channels} but model.in_channels is {m.in_channels}; set both alike")
    _check(0.0 < d.val_fraction < 1.0, "data.val_fraction", "must be in (0, 1)")
    _check(d.train_limit >= 0 and d.val_limit >= 0, "data.train_limit", "limits must be >= 0")
    _check(0.0 < d.random_crop_scale <= 1.0, "data.random_crop_scale", "must be in (0, 1]")
    _check(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    _check(d.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0")
    _check(d.train_num_samples >= 0, "data.train_num_samples", "must be >= 0")

    _check(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
    _check(t.epochs >= 0, "train.epochs", "must be >= 0")
    _check(t.max_steps >= 0, "train.max_steps", "must be >= 0")
    _check(t.epochs > 0 or t.max_steps > 0, "train.max_steps",
           "set train.max_steps or train.epochs (--epochs) to a positive value")
    _check(t.lr > 0 and t.disc_lr > 0, "train.lr", "learning rates must be > 0")
    _check(len(t.adam_betas) == 2 and all(0 <= b < 1 for b in t.adam_betas), "train.adam_betas",
           "must be two numbers in [0, 1)")
    _check(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    _one_of(t.lr_schedule, "train.lr_schedule", ("cosine", "constant"))
    _check(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
    _check(t.grad_accum >= 1, "train.grad_accum", "must be >= 1")
    _check(t.grad_clip >= 0, "train.grad_clip", "must be >= 0")
    if t.mixed_precision == "False":  # YAML 1.1 reads a bare `no` (train.mixed_precision=no) as false
        t.mixed_precision = "no"
    _one_of(t.mixed_precision, "train.mixed_precision", PRECISIONS)
    _one_of(t.backend, "train.backend", BACKENDS)
    _check(t.collective_timeout_s > 0, "train.collective_timeout_s", "must be > 0 (seconds)")
    _check(t.heartbeat_timeout_s >= 0 and t.lock_wait_s >= 0, "train.heartbeat_timeout_s",
           "heartbeat_timeout_s and lock_wait_s must be >= 0 (seconds)")
    _check(0 <= t.ema_decay < 1, "train.ema_decay", "must be in [0, 1)")
    for key in ("log_every",):
        _check(getattr(t, key) >= 1, f"train.{key}", "must be >= 1")
    for key in ("eval_every", "save_every", "keep_every"):
        _check(getattr(t, key) >= 0, f"train.{key}", "must be >= 0")
    _check(t.keep_last >= 1, "train.keep_last", "must be >= 1")
    _check(t.stop_at_step >= 0, "train.stop_at_step", "must be >= 0")
    _check(bool(t.name) and "/" not in t.name, "train.name", "must be a non-empty name without '/'")
    _check(bool(t.compile_backend), "train.compile_backend", "must name a torch.compile backend")
    _check(cfg.log.usage_window >= 1, "log.usage_window", "must be >= 1")
    _check(cfg.eval.batch_size >= 1, "eval.batch_size", "must be >= 1")
    _one_of(cfg.eval.precision, "eval.precision", ("fp32", "bf16"))
    _check(cfg.eval.inception_input_size >= 75, "eval.inception_input_size", "Inception needs >= 75 pixels")
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (for checkpoints, trackers, JSON)."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any]) -> Config:
    """Inverse of :func:`to_dict`, with the same key and type checks as a YAML file."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(data)))
    except OmegaConfBaseException as exc:
        raise ConfigError(_one_line(exc)) from None
    return validate(cfg)


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
