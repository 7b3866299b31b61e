"""The training loop: set the lr, generator step, discriminator step, log, evaluate, checkpoint.

One process and R processes run this same code; the only distributed pieces are Accelerate's
gradient all-reduce and the quantizer's statistics all-reduce (bavq.dist).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from bavq import dist
from bavq.backend import make_accelerator
from bavq.config import Config, save_config, to_dict
from bavq.data import build_eval_loader, build_train_stream
from bavq.evaluation import evaluate_model, write_final_outputs
from bavq.losses import discriminator_loss
from bavq.models import plain_generator
from bavq.paths import removed_on_failure
from bavq.train import checkpoint as ckpt
from bavq.train.build import build_parts
from bavq.train.deepspeed_backend import deepspeed_plugins
from bavq.train.run_logger import RunLogger, choose_trackers
from bavq.train.runlock import acquire_run_lock
from bavq.train.schedule import lr_at, set_lr
from bavq.train.state import EvalInterrupted, PreemptionFlag, TrainState, interruptible, tensor_checksum
from bavq.train.watchdog import Watchdog


class Preempted(Exception):
    """Raised after a preemption checkpoint was saved; the entry point exits with EXIT_PREEMPTED."""


class Trainer:
    """Builds everything from one Config and runs the loop. ``Trainer(cfg).fit()`` is the story."""

    def __init__(self, cfg: Config):
        # a failed start (config or data mistake, refused launcher) leaves no empty run folder behind
        with removed_on_failure(Path(cfg.train.output_dir) / cfg.train.name):
            self._setup(cfg)

    def _setup(self, cfg: Config) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.train.output_dir) / cfg.train.name
        self.ckpt_root = self.run_dir / "checkpoints"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        trackers = choose_trackers(cfg.log.wandb, cfg.log.tensorboard, self._warn)
        self.accelerator = make_accelerator(cfg, str(self.run_dir), trackers,
                                            deepspeed_plugins if cfg.train.backend == "deepspeed" else None)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self._guard_run()
        self._build_data()
        self._build_models()
        self.state = TrainState()
        for obj in (self.state,) + ((self.ema,) if self.ema is not None else ()):
            self.accelerator.register_for_checkpointing(obj)
        self.preempt = PreemptionFlag()
        self._saved_step = None  # the step whose checkpoint is on disk and intact (saved or resumed from)
        self.logger = RunLogger(self.accelerator, self.run_dir, trackers, cfg.log.wandb_project,
                                to_dict(cfg), cfg.train.name)

    # ------------------------------------------------------------------ build
    def _warn(self, msg: str) -> None:
        if dist.launcher_rank() == 0:
            print(msg, flush=True)

    def _guard_run(self) -> None:
        """One writer per run folder (rank 0's flock), and a watchdog that stops this rank when its
        launcher or a peer rank dies (see bavq.train.watchdog for the bounds)."""
        t = self.cfg.train
        self.run_lock = acquire_run_lock(self.run_dir, t.lock_wait_s, self.accelerator.is_main_process)
        self.watchdog = Watchdog(self.rank, self.world, dist.default_store(),
                                 prefix=f"bavq/watchdog/{dist.launcher_restart_count()}",
                                 timeout_s=t.heartbeat_timeout_s,
                                 watch_parent=dist.launched_by_distributed_launcher()).start()

    def _build_data(self) -> None:
        cfg = self.cfg
        self.stream = build_train_stream(cfg.data, self.rank, self.world, batch_size=cfg.train.batch_size,
                                         seed=cfg.train.seed)
        per_step = cfg.train.grad_accum
        if cfg.train.max_steps > 0:
            self.total_steps = cfg.train.max_steps
        else:
            self.total_steps = max(1, math.ceil(cfg.train.epochs * self.stream.batches_per_epoch / per_step))
        self.global_batch = cfg.train.batch_size * self.world * per_step

    def _build_models(self) -> None:
        self.deepspeed = self.cfg.train.backend == "deepspeed"
        parts = build_parts(self.cfg, self.accelerator)
        self.model, self.opt_g, self.disc, self.opt_d = parts.model, parts.opt_g, parts.disc, parts.opt_d
        self.gen_loss, self.ema, self.input_dtype = parts.gen_loss, parts.ema, parts.input_dtype

    def _backward(self, module, loss: torch.Tensor, num_micro: int, last: bool) -> None:
        """DDP: Accelerate's backward of the micro-batch share. DeepSpeed: each engine runs its own
        backward and, at the accumulation boundary, its step (clip + optimizer + zero_grad), because
        ``accelerator.backward`` only knows the first engine."""
        if self.deepspeed:
            module.set_gradient_accumulation_boundary(last)
            module.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
            if last:
                module.step()
        else:
            self.accelerator.backward(loss / num_micro)

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    @property
    def quantizer(self):
        return self.unwrapped.quantizer

    # ------------------------------------------------------------------ the story
    def fit(self) -> dict:
        """Resume if possible, train to ``total_steps``, evaluate, write the outputs."""
        self._resume()
        self._plan_length()
        self._write_run_header()
        # Installed until the very end, so a signal during the final evaluation is honoured too; and
        # left installed when an exception escapes: the launcher's SIGTERM after a peer died must not
        # cut short this rank's one-line report on its way out.
        self.preempt.install()
        self._loop()
        if self._saved_step != self.state.step:  # not a folder name: an older damaged one may share it
            self.save()  # the end of training (or of this job) is always resumable and exportable
        if self.state.step < self.total_steps:  # train.stop_at_step ended this job early
            self.preempt.uninstall()
            self.logger.print(f"stopped at step {self.state.step} of {self.total_steps} (train.stop_at_step); "
                              "run the same command again to continue")
            self.logger.close()
            return None
        try:
            final = self.final_evaluation()
        except EvalInterrupted:
            self._handle_preemption()  # the final checkpoint exists: the requeued job re-runs the evaluation
        self.preempt.uninstall()
        self.logger.close()
        return final

    def _plan_length(self) -> None:
        """Fix the run's length (samples) and lr schedule in its state when it starts; a resume keeps
        them, on any world size: the remaining samples are split into steps of the current global batch."""
        t, s = self.cfg.train, self.state
        setting = f"max_steps={t.max_steps}" if t.max_steps > 0 else f"epochs={t.epochs}"
        if s.total_samples and s.length_setting != setting:
            self.logger.print(f"NOTE: training length changed ({s.length_setting} -> {setting}): re-planned at "
                              f"step {s.step} with the current global batch")
        if not s.total_samples or s.length_setting != setting:  # a new run, a changed length, or an old checkpoint
            s.planned_steps, s.start_global_batch = self.total_steps, self.global_batch
            s.total_samples, s.length_setting = self.total_steps * self.global_batch, setting
        elif self.global_batch != s.start_global_batch:
            self.logger.print(f"NOTE: global batch {self.global_batch} (world size {self.world}) differs from the "
                              f"run's {s.start_global_batch}: keeping its {s.total_samples} samples and lr schedule")
        self.total_steps = s.step + math.ceil(max(0, s.total_samples - s.samples_seen) / self.global_batch)

    def _loop(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        batches = self.stream.iterate(start_batch=self.state.step * cfg.train.grad_accum,
                                      position=self.state.data_position)
        bar = self._progress_bar()
        t_last, samples_last = time.time(), self.state.samples_seen
        end = min(self.total_steps, cfg.train.stop_at_step or self.total_steps)
        while self.state.step < end:
            step = self.state.step
            t0 = time.time()
            sched, planned = self.state.schedule_step(), self.state.planned_steps
            set_lr(self.opt_g, lr_at(sched, planned, cfg.train.lr, cfg.train))
            micro = [next(batches).to(acc.device, dtype=self.input_dtype) for _ in range(cfg.train.grad_accum)]
            metrics, recons = self.generator_step(micro, step)
            if self.disc is not None and step >= cfg.loss.disc_start:
                set_lr(self.opt_d, lr_at(sched - cfg.loss.disc_start, planned - cfg.loss.disc_start,
                                         cfg.train.disc_lr, cfg.train))
                metrics.update(self.discriminator_step(micro, recons, step))
            if self.ema is not None:
                self.ema.update(self.unwrapped, step=step)
            self.state.step += 1
            self.state.samples_seen += self.global_batch
            self.state.data_position = getattr(self.stream, "position", None)
            self.state.wall_seconds += time.time() - t0
            if bar is not None:
                bar.update(1)
            if self.state.step % cfg.train.log_every == 0 or self.state.step == self.total_steps:
                rate = (self.state.samples_seen - samples_last) / max(1e-9, time.time() - t_last)
                t_last, samples_last = time.time(), self.state.samples_seen
                self._log_training(metrics, rate, bar)
            if cfg.train.eval_every and self.state.step % cfg.train.eval_every == 0 \
                    and self.state.step < self.total_steps:
                try:
                    self.logger.log(self.state.step, {f"val/{k}": v for k, v in self.evaluate().items()})
                except EvalInterrupted:
                    pass  # all ranks stopped evaluating; the preemption check below saves and exits
            if cfg.train.save_every and self.state.step % cfg.train.save_every == 0:
                self.save()
            if dist.any_rank(self.preempt.requested):
                self._handle_preemption()
        if bar is not None:
            bar.close()

    def generator_step(self, micro: list[torch.Tensor], step: int) -> tuple[dict, list[torch.Tensor]]:
        """Encoder/decoder update over ``grad_accum`` micro-batches; the codebook moves by its own
        statistics (one all-reduce per step), not by this optimizer."""
        cfg, acc = self.cfg, self.accelerator
        gan_on = self.disc is not None and step >= cfg.loss.disc_start
        disc_plain = acc.unwrap_model(self.disc) if gan_on else None
        if disc_plain is not None:
            disc_plain.requires_grad_(False)  # frozen, and unwrapped: no DDP hooks in this step
        self.model.train()
        sums, recons, q_metrics = {}, [], {}
        for i, x in enumerate(micro):
            sync = nullcontext() if i == len(micro) - 1 else acc.no_sync(self.model)
            with sync:
                recon, q = self.model(x)
                loss, metrics = self._generator_loss(x, recon, q, disc_plain, step)
                self._backward(self.model, loss, len(micro), last=i == len(micro) - 1)
            recons.append(recon.detach())
            q_metrics = q.metrics
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / len(micro)
        if not self.quantizer.auto_update:
            q_metrics = self.quantizer.update_codebook()
        if self.deepspeed:
            sums["grad_norm"] = float(self.model.get_global_grad_norm() or 0.0)
        else:
            if cfg.train.grad_clip > 0:
                sums["grad_norm"] = acc.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip)
            self.opt_g.step()
            self.opt_g.zero_grad(set_to_none=True)
        if disc_plain is not None:
            disc_plain.requires_grad_(True)
        return {**sums, **{f"quantizer/{k}": v for k, v in q_metrics.items()}}, recons

    def _generator_loss(self, x, recon, q, disc_plain, step: int) -> tuple[torch.Tensor, dict]:
        """The generator loss to back-propagate. With the GAN on, the image losses are evaluated on a
        detached leaf copy of the reconstruction (the adaptive weight needs gradients w.r.t. the last
        layer, which must not run the wrapped model's gradient hooks early), and the model gets the
        surrogate <recon, dL/drecon> + quantizer loss, whose gradient is exactly that of L."""
        if disc_plain is None:
            return self.gen_loss(x, recon, q.loss, None, None, step)
        leaf = recon.detach().requires_grad_(True)
        grad_of = self.unwrapped.last_layer_grad(leaf)
        image_loss, metrics = self.gen_loss(x, leaf, leaf.new_zeros(()), disc_plain(leaf), grad_of, step)
        (grad_recon,) = torch.autograd.grad(image_loss, leaf)
        metrics["quant_loss"] = q.loss.detach().float()
        metrics["total"] = metrics["total"] + metrics["quant_loss"]
        return (recon * grad_recon).sum() + q.loss, metrics

    def discriminator_step(self, micro, recons, step: int) -> dict:
        cfg, acc = self.cfg, self.accelerator
        self.disc.train()
        sums = {}
        for i, (x, recon) in enumerate(zip(micro, recons)):
            sync = nullcontext() if i == len(micro) - 1 else acc.no_sync(self.disc)
            with sync:
                loss, metrics = discriminator_loss(self.disc(x), self.disc(recon), step, cfg.loss)
                self._backward(self.disc, loss, len(micro), last=i == len(micro) - 1)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / len(micro)
        if not self.deepspeed:  # DeepSpeed stepped (and clipped, per its JSON) in _backward
            if cfg.train.grad_clip > 0:
                acc.clip_grad_norm_(self.disc.parameters(), cfg.train.grad_clip)
            self.opt_d.step()
            self.opt_d.zero_grad(set_to_none=True)
        return sums

    # ------------------------------------------------------------------ logging / eval
    def _progress_bar(self):
        if not (self.accelerator.is_main_process and self.cfg.log.progress):
            return None
        from bavq.progress import progress

        # a bar on a terminal; plain periodic lines in a batch job's log (no carriage returns)
        return progress(total=self.total_steps, initial=self.state.step, desc=self.cfg.train.name,
                        unit="step", mininterval=0.5)

    def _log_training(self, metrics: dict, samples_per_s: float, bar) -> None:
        """Average per-rank losses over ranks (quantizer metrics are already global), log, check sync."""
        local = {k: v for k, v in metrics.items() if not k.startswith("quantizer/")}
        keys = sorted(local)
        device = dist.comm_device()
        # One collective for the losses and the corrupt-sample counter; then one host sync (tolist).
        vec = torch.stack([torch.as_tensor(local[k], dtype=torch.float64, device=device).reshape(())
                           for k in keys] + [dist.tensor(float(getattr(self.stream, "skipped", 0)))])
        values = dist.all_reduce_sum(vec).tolist()
        row = {k: v / self.world for k, v in zip(keys, values)}
        row.update({k: float(v) for k, v in metrics.items() if k.startswith("quantizer/")})
        self.state.corrupt_skipped = int(values[-1])
        row.update({"lr": self.opt_g.param_groups[0]["lr"], "samples_seen": self.state.samples_seen,
                    "samples_per_s": samples_per_s, "epoch": self.state.samples_seen / max(1, self.stream.num_samples),
                    "data/corrupt_skipped": self.state.corrupt_skipped})
        if self.cfg.train.check_codebook_sync:
            self.check_codebook_sync()
        self.logger.log(self.state.step, row)
        if bar is not None:
            bar.set_postfix(loss=f"{row.get('total', float('nan')):.4f}",
                            usage=f"{row.get('quantizer/usage_window', float('nan')):.3f}",
                            img_s=f"{samples_per_s:.0f}")
        elif self.accelerator.is_main_process:
            self.logger.print(f"step {self.state.step}/{self.total_steps} loss {row.get('total', 0):.4f} "
                              f"usage {row.get('quantizer/usage_window', 0):.3f} {samples_per_s:.0f} img/s")

    def check_codebook_sync(self) -> None:
        """Every rank must hold the same codebook; a difference means a missing reduction."""
        sums = dist.all_gather_object(tensor_checksum(self.quantizer.codebook))
        if max(sums) - min(sums) > 1e-6 * max(1.0, abs(sums[0])):
            raise RuntimeError(f"codebooks differ across ranks at step {self.state.step}: checksums {sums}")

    def _evaluate(self):
        """The held-out split (all ranks) through a plain fp32 copy of the generator: the weight EMA
        when on, else the live weights. Evaluation never runs a DDP/DeepSpeed engine, so bf16
        DeepSpeed weights and fp32 images never meet, and every backend evaluates alike."""
        source = self.ema.module if self.ema is not None else self.unwrapped
        model = plain_generator(self.cfg, source.state_dict(), self.accelerator.device)
        loader = build_eval_loader(self.cfg.data, self.rank, self.world, batch_size=self.cfg.eval.batch_size)
        loader = interruptible(loader, lambda: self.preempt.requested)
        return model, evaluate_model(model, loader, self.cfg, self.accelerator.device)

    def evaluate(self) -> dict:
        return self._evaluate()[1].summary()

    def final_evaluation(self) -> dict:
        model, result = self._evaluate()
        extra = {"steps": self.state.step, "samples_seen": self.state.samples_seen,
                 "wall_seconds": round(self.state.wall_seconds, 2), "world_size": self.world,
                 "codebook_checksums": dist.all_gather_object(tensor_checksum(self.quantizer.codebook))}
        final = write_final_outputs(self.run_dir, self.cfg, model, result, extra,
                                    is_main=self.accelerator.is_main_process)
        self.logger.log(self.state.step, {f"final/{k}": v for k, v in final.items() if not k.endswith("_reason")})
        self.logger.log_evaluation(self.state.step, result)  # held-out scalars, images, histogram
        self.accelerator.wait_for_everyone()
        return final

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        t = self.cfg.train
        path = ckpt.save_checkpoint(self.accelerator, self.ckpt_root, self.state.step, self.cfg,
                                    t.keep_last, t.keep_every)
        self.logger.print(f"saved checkpoint {path}")
        self._saved_step = self.state.step
        return path

    def _resume(self) -> None:
        if self.accelerator.is_main_process:
            ckpt.clean_partial(self.ckpt_root)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            (self.run_dir / "PREEMPTED").unlink(missing_ok=True)
        path = ckpt.find_resume_checkpoint(self.cfg.train.resume, self.ckpt_root, log=self.logger.print)
        if path is None:
            self._archive_previous_outputs()
            return
        for note in ckpt.check_resume_compatible(self.cfg, path):
            self.logger.print(f"NOTE: resuming with a changed setting: {note}")
        self.accelerator.load_state(str(path))
        self._saved_step = self.state.step
        self.logger.print(f"resumed from {path} at step {self.state.step} ({self.state.samples_seen} samples)")

    def _archive_previous_outputs(self) -> None:
        """A fresh start in a folder with outputs of an earlier attempt (no checkpoint to resume):
        keep them under a new name rather than appending to or silently replacing them."""
        if not self.accelerator.is_main_process:
            return
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for name in ("metrics.jsonl", "final_metrics.json"):
            old = self.run_dir / name
            if old.exists():
                old.rename(self.run_dir / f"{name}.previous-{stamp}")
                self.logger.print(f"NOTE: starting over; kept the earlier {name} as {name}.previous-{stamp}")

    def _handle_preemption(self) -> None:
        if self._saved_step == self.state.step:  # saved just now: do not write it twice
            self.logger.print(f"preemption signal ({self.preempt.signal_name or 'on another rank'}): "
                              f"checkpoint of step {self.state.step} already saved")
        else:
            self.logger.print(f"preemption signal ({self.preempt.signal_name or 'on another rank'}): saving")
            self.save()
        if self.accelerator.is_main_process:  # launchers turn our exit code 75 into 1: leave a marker too
            (self.run_dir / "PREEMPTED").write_text(f"{self.state.step}\n")
        if self.accelerator.is_main_process and dist.under_slurm():
            ok, msg = dist.slurm_requeue()
            self.logger.print(msg)
        self.logger.close()
        raise Preempted(f"preempted at step {self.state.step}; checkpoint saved")

    def _write_run_header(self) -> None:
        if self.accelerator.is_main_process:
            save_config(self.cfg, self.run_dir / "config.yaml")
            self.logger.print(
                f"run {self.run_dir}: {self.world} process(es) on {self.accelerator.device}, "
                f"{self.total_steps} steps of {self.global_batch} images "
                f"({self.stream.batches_per_epoch} batches/rank/epoch, {self.stream.num_samples} training images), "
                f"quantizer {self.cfg.quantizer.name} K={self.cfg.quantizer.num_codes}")
