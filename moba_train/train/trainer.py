"""The training loop: build everything from one Config, then step.

Loss is the mean over every real (unmasked) token of the global batch (all micro-batches, all dp x cp
ranks): each micro-batch contributes sum(token losses) / global token count.
"""

import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, replace

import torch
import torch.distributed as dist

from moba_train.config import Config
from moba_train.data import Loader, build_dataset
from moba_train.errors import ConfigError, TrainingError
from moba_train.model.llama import IGNORE_INDEX
from moba_train.model.pretrained import init_model, write_run_model_config
from moba_train.parallel import ParallelDims, clip_grad_norm, init_parallel, parallelize, shard_micro_batch
from moba_train.train.metrics import MetricsLogger
from moba_train.train.optim import apply_config, build_optimizer, build_scheduler
from moba_train.train.checkpoint import Checkpointer, init_source, resolve_resume
from moba_train.train.signals import StopFlag
from moba_train.train.stages import TrainingStages

log = logging.getLogger(__name__)


def pick_device(name: str, backend: str = "auto") -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA GPU is visible; use train.device=cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cuda" and backend in ("varlen", "triton"):  # found before the model is built, not at its first call
        from moba_train.ops.fused.autograd import interpreting  # Triton loads only for runs that name it

        if not (backend == "triton" and interpreting()):
            raise ConfigError(f"attention.backend={backend} needs a CUDA GPU and this run is on {name}; use "
                              "attention.backend=auto or naive")
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.device = pick_device(cfg.train.device, cfg.attention.backend)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dims: ParallelDims = init_parallel(cfg.parallel, self.device)
        torch.manual_seed(cfg.train.seed)
        # random, or model.init_from's; random where a checkpoint of this run follows (its weights replace them)
        resuming = resolve_resume(cfg.checkpoint.resume, cfg.train.out_dir) is not None
        start = replace(cfg.model, init_from=None) if resuming else cfg.model
        model = init_model(start, cfg.attention, self.device, resolved=True)
        self.model = parallelize(model, cfg, self.dims)
        self.stages = TrainingStages(cfg, self.dims.is_main)  # attention.schedule, data.seq_len_schedule
        self.optimizer = build_optimizer(self.model, cfg.train, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        global_batch = cfg.data.batch_size * self.dims.dp * cfg.train.grad_accum
        dataset = build_dataset(cfg.data, cfg.train.seed, vocab_size=cfg.model.vocab_size)
        self.loader = Loader(dataset, cfg.data.batch_size, self.dims.dp_rank, self.dims.dp, cfg.train.seed)
        self.step = 0
        self.run_info = {"global_batch": global_batch, "seed": cfg.train.seed, "data": cfg.data.path,
                         "seq_len": cfg.data.seq_len, "steps": cfg.train.steps, "attention": asdict(cfg.attention),
                         "init_from": init_source(cfg.model.init_from)}
        if cfg.data.name == "megatron":  # the sample index covers one pass since this marker (a resume compares)
            self.run_info["data_index"] = "one pass"
        self.checkpointer = Checkpointer(cfg.checkpoint, cfg.train.out_dir, self.dims.is_main)
        if self.checkpointer.resume(self, cfg.train.out_dir, self.run_info, cfg.model.init_from):
            apply_config(self.optimizer, self.scheduler, cfg.train)
        if self.dims.is_main:  # the architecture of this run's checkpoints (init_from resolved), once resume
            write_run_model_config(cfg.model, cfg.train.out_dir)  # accepted it (a refused one leaves the old)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         else nullcontext())

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.dims.loss_group is not None:
            dist.all_reduce(t, group=self.dims.loss_group)
        return t

    def train_step(self) -> dict:
        batches = [self.stages.shape_batch(self.loader.next_batch(), self.step)
                   for _ in range(self.cfg.train.grad_accum)]
        batches = [{k: v.to(self.device, non_blocking=True) for k, v in b.items()} for b in batches]
        batches = [shard_micro_batch(b, self.dims) for b in batches]  # cp: this rank's part of the sequence
        local_tokens = sum((b["labels"] != IGNORE_INDEX).sum() for b in batches)
        global_tokens = self._all_reduce(local_tokens.float()).clamp(min=1)
        loss_sum = torch.zeros((), device=self.device)
        for batch in batches:
            with self.autocast:
                loss, _ = self.model(batch["input_ids"], batch.get("positions"), batch.get("cu_seqlens"),
                                     labels=batch["labels"])
            (loss * self.dims.grad_scale / global_tokens).backward()  # FSDP averages; we want the sum
            loss_sum += loss.detach()
        # grad_clip <= 0: no clipping (an infinite bound scales by exactly 1), the norm is still measured
        max_norm = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        grad_norm = clip_grad_norm(self.model.parameters(), max_norm)  # full norm (FSDP shards)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._all_reduce(loss_sum) / global_tokens
        tokens = sum(b["input_ids"].numel() for b in batches) * self.dims.dp * self.dims.cp
        return {"loss": loss, "grad_norm": grad_norm, "tokens": tokens}

    def train(self) -> None:
        cfg = self.cfg.train
        logger = MetricsLogger(cfg.out_dir, cfg.steps, self.step, self.cfg.logger, self.dims.is_main,
                               run_config=asdict(self.cfg))
        self.model.train()
        if self.step >= cfg.steps and self.dims.is_main:  # a finished run launched again, e.g. with new settings
            log.warning("the checkpoint at step %d has reached train.steps=%d: nothing to train (raise train.steps "
                        "to go on, or give a new run another train.out_dir)", self.step, cfg.steps)
        tick, tokens = time.perf_counter(), 0
        stop = StopFlag().install()
        try:
            while self.step < cfg.steps:
                lr = self.optimizer.param_groups[0]["lr"]
                self.stages.begin_step(self.model, self.step)
                out = self.train_step()
                self.step += 1
                tokens += out["tokens"]
                logger.advance()
                stopping = stop.agreed()
                due = self.checkpointer.due(self.step, final=stopping or self.step == cfg.steps)
                log_now = self.step % cfg.log_every == 0 or self.step == cfg.steps
                if due or log_now:
                    # read the values first: that waits for the GPU, which the host otherwise runs ahead of, so
                    # the interval times the steps' work rather than their queueing
                    loss, grad_norm = out["loss"].item(), float(out["grad_norm"])
                    # the loss is the step's input weights'; a non-finite grad norm means its update broke them.
                    # Both are reduced over all ranks, so all stop here together
                    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                        self.checkpointer.wait()  # an earlier step's save in flight completes
                        raise TrainingError(f"loss {loss}, grad norm {grad_norm} at step {self.step}: training "
                                            "diverged; this step is not saved, earlier checkpoints are kept (lower "
                                            "train.lr, raise train.warmup_steps or check the data)")
                if log_now:
                    elapsed = time.perf_counter() - tick
                    logger.log(self.step, {"loss": loss, "lr": lr, "grad_norm": grad_norm,
                                           "tokens_per_s": tokens / elapsed})
                    tick, tokens = time.perf_counter(), 0
                self.checkpointer.poll()
                if due:
                    saving = time.perf_counter()
                    self.checkpointer.save(self, self.run_info)
                    tick += time.perf_counter() - saving  # tokens_per_s times the training steps only
                    stopping = stopping or stop.agreed()  # a signal during the save: that save covers this step
                if stopping:
                    break
            self.checkpointer.wait()
        finally:
            stop.uninstall()
            logger.close()
