"""`LlavaLitModule`: the LightningModule that trains a `LlavaModel` through LLaVA's stages.

Stages are explicit methods that set `requires_grad` and log a table of trainable and frozen
parameters: `align` (projector only, stage 1), `finetune` (projector + LLM, stage 2), `full`
(everything), `lora` (LoRA adapters on the LLM through peft, projector fully trained), each with
an option to unfreeze the last k vision blocks. Frozen parts stay in eval mode, and a frozen
vision tower runs without building a graph.

The loss of an optimizer step is the mean over all its supervised tokens (summed over the
gradient-accumulation micro-batches and the ranks), so accumulation with uneven lengths gives the
gradient of one large batch. The count is known before backward: the training loader reads each
step's micro-batches ahead and annotates them with the step's token count (training/step_tokens.py),
and every micro-batch returns its summed token loss scaled by it. Nothing rescales gradients after
backward, so the same holds where they live in the strategy's own buffers (DeepSpeed ZeRO).
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torchmetrics import MeanMetric, Metric, SumMetric

from .inference.generate import generate
from .model import LanguageSpec, LlavaModel, LlavaSpec, VisionSpec, get_preset
from .model.llava import IGNORE_INDEX
from .training.checkpoint_file import callers_trust_remote_code, read_checkpoint, with_callers_trust
from .training.epoch_end_resume import epoch_end_as_last_batch
from .training.params import param_groups, param_table
from .training.schedule import warmup_cosine
from .training.step_tokens import STEP_FIRST, STEP_TOKENS, count_supervised, token_mean_scale

log = logging.getLogger(__name__)

Stage = Literal["align", "finetune", "full", "lora"]


@dataclass
class LoraConfig:
    """LoRA settings for the `lora` stage (LLaVA-1.5 LoRA: r 128, alpha 256)."""

    r: int = 128
    """Adapter rank."""
    alpha: int = 256
    """Scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] | str = "all-linear"
    """LLM module names to adapt, or `all-linear` (every Linear except the LM head)."""


@dataclass
class OptimConfig:
    """AdamW with parameter groups and a warmup + cosine schedule."""

    lr: float = 2e-5
    """Learning rate of the LLM (and of everything without its own rate)."""
    projector_lr: float | None = None
    """Projector learning rate; None uses `lr`."""
    vision_lr: float | None = None
    """Learning rate of unfrozen vision blocks; None uses `lr`."""
    weight_decay: float = 0.0
    """AdamW weight decay (never applied to biases and norms)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_ratio: float = 0.03
    """Linear warmup over this fraction of the total optimizer steps."""
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of each group's learning rate."""


# Checkpoints store these in `hyper_parameters`; allow them under torch.load(weights_only=True).
torch.serialization.add_safe_globals([LlavaSpec, VisionSpec, LanguageSpec, OptimConfig, LoraConfig])


def _shards_modules(strategy) -> bool:
    """Strategies that gather parameters module by module on all ranks together (FSDP2, FSDP, DeepSpeed)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    return isinstance(strategy, (ModelParallelStrategy, FSDPStrategy, DeepSpeedStrategy))


def _is_zero3(strategy) -> bool:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3


def _is_fsdp1(strategy) -> bool:
    from .training.fsdp1 import LlavaFSDPStrategy

    return isinstance(strategy, LlavaFSDPStrategy)


def _inits_sharded(strategy) -> bool:
    """Strategies that load weights after sharding with `sharded_init`: FSDP2, FSDP1 (ours), ZeRO-3."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(strategy, ModelParallelStrategy) or _is_zero3(strategy) or _is_fsdp1(strategy)


class LlavaLitModule(L.LightningModule):
    """LLaVA training: stage-specific freezing, token-normalized loss, metrics, projector hand-off."""

    def __init__(
        self,
        preset: str | None = None,
        spec: LlavaSpec | None = None,
        stage: Stage = "align",
        unfreeze_vision_blocks: int = 0,
        optim: OptimConfig = OptimConfig(),  # noqa: B008 (a frozen-by-convention default jsonargparse can show)
        lora: LoraConfig = LoraConfig(),  # noqa: B008
        gradient_checkpointing: bool = False,
        init_projector: str | None = None,
        projector_artifact: str | None = "projector",
        template: str = "vicuna_v1",
        image_aspect: Literal["square", "pad"] = "pad",
        max_new_tokens: int = 64,
        sharded_init: bool = False,
    ):
        """
        Args:
            preset: Model preset (`tiny`, `llava-1.5-7b`, ...); when set it replaces `spec`.
            spec: The model: vision tower, projector and language model (used when preset is None).
            stage: What trains: align (projector), finetune (projector + LLM), full, lora.
            unfreeze_vision_blocks: Also train the last k vision-tower blocks.
            optim: Optimizer and schedule settings.
            lora: LoRA settings (stage lora).
            gradient_checkpointing: Recompute activations of the trained transformer blocks in backward.
            init_projector: Projector weights to start from (our .safetensors artifact or LLaVA's mm_projector.bin).
            projector_artifact: At the end of `align`, write `<name>.safetensors` + `<name>.json` into the
                run's log directory (None: do not).
            template: Conversation template for generation / predict (training data has its own).
            image_aspect: Image aspect handling for generation / predict.
            max_new_tokens: Generation length for predict.
            sharded_init: Build the model as an empty meta-device skeleton and load the weights only once
                it is sharded (FSDP2, FSDP, DeepSpeed ZeRO-3), so no rank but 0 holds the full model;
                other strategies build it in full on every rank.
        """
        super().__init__()
        self.save_hyperparameters()
        if preset is None and spec is None:
            raise ValueError("give the model as `preset` (e.g. tiny, llava-1.5-7b) or as `spec`")
        self.spec = get_preset(preset) if preset is not None else spec
        # Under load_from_checkpoint (or a CLI run from a checkpoint): the caller's trust_remote_code.
        self.spec = with_callers_trust(self.spec)
        self.stage, self.unfreeze_vision_blocks = stage, unfreeze_vision_blocks
        self.optim, self.lora_config = optim, lora
        self.gradient_checkpointing = gradient_checkpointing
        self.init_projector, self.projector_artifact = init_projector, projector_artifact
        self.template, self.image_aspect, self.max_new_tokens = template, image_aspect, max_new_tokens
        self.sharded_init = sharded_init
        if sharded_init:
            if stage == "lora":
                raise ValueError(
                    "sharded_init does not support stage 'lora' (peft wraps a materialized model)"
                )
            # The weights come later (configure_model), from the RNG state a direct build would use now.
            self._init_rng_state = torch.random.get_rng_state()
            with torch.device("meta"):
                self.model = LlavaModel.from_spec(self.spec, load_weights=False)
        else:
            self.model = self._build_model()
        self.apply_stage()
        self.train_loss = MeanMetric()
        self.val_loss_sum, self.val_tokens, self.val_correct = SumMetric(), SumMetric(), SumMetric()
        self._step_tokens: torch.Tensor | None = None  # the current step's supervised tokens, all ranks
        self._logged_tokens: torch.Tensor | None = None
        self._warned_unannotated = False

    def _build_model(self, zero3: bool = False) -> LlavaModel:
        """The full model: weights by hub name (random init for `config` parts) + `init_projector`
        (`zero3`: built under zero.Init, so the projector artifact loads into gathered partitions)."""
        model = LlavaModel.from_spec(self.spec)
        if self.init_projector:
            gather = contextlib.nullcontext()
            if zero3:
                import deepspeed

                projector = list(model.multi_modal_projector.parameters())
                gather = deepspeed.zero.GatheredParameters(projector, modifier_rank=0)
            with gather:
                model.init_projector_from(self.init_projector)
        return model

    def _build_model_with_init_rng(self, zero3: bool = False) -> LlavaModel:
        """`_build_model` from the RNG state of `__init__`: the weights a non-sharded run starts from;
        on CPU, except under zero.Init, which places and partitions the parameters itself."""
        with torch.random.fork_rng(devices=[]), contextlib.nullcontext() if zero3 else torch.device("cpu"):
            torch.random.set_rng_state(self._init_rng_state)
            return self._build_model(zero3)

    def _build_under_zero_init(self, strategy) -> None:
        """DeepSpeed ZeRO-3 sharded init: `configure_model` runs under `deepspeed.zero.Init`, so each
        module's parameters are partitioned as soon as it is built (rank 0's values broadcast), and
        transformers' `from_pretrained` loads hub weights into the partitions (it sees ZeRO-3 through
        `HfDeepSpeedConfig`, which must stay alive: transformers holds only a weak reference)."""
        from transformers.integrations import HfDeepSpeedConfig

        self._hf_deepspeed_config = HfDeepSpeedConfig(strategy.config)
        self.model = self._build_model_with_init_rng(zero3=True)
        self.apply_stage()

    def _is_skeleton(self) -> bool:
        """The model is still the meta-device skeleton of `sharded_init` (no storage yet)."""
        return any(p.is_meta for p in self.model.parameters())

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path,
        map_location=None,
        hparams_file=None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        *,
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> LlavaLitModule:
        """Lightning's `load_from_checkpoint`, with two guards for files one may not trust:

        - remote code: the model spec's `trust_remote_code` is this argument, whatever the checkpoint's
          hyperparameters (or `hparams_file`, or `spec` in kwargs) say; a checkpoint that asked for it is
          named in a warning;
        - a local file is first read with weights only (memory-mapped: the weights are not read), so an
          empty, truncated or foreign file, or one holding objects outside the allowlist, raises
          `CheckpointLoadError` naming it (skipped when the caller passes `weights_only=False`).
        """
        is_local_file = isinstance(checkpoint_path, (str, Path)) and Path(checkpoint_path).is_file()
        if is_local_file and weights_only is not False:
            read_checkpoint(checkpoint_path)  # the clear error, before Lightning's own torch.load
        source = str(checkpoint_path) if isinstance(checkpoint_path, (str, Path)) else repr(checkpoint_path)
        with callers_trust_remote_code(trust_remote_code, source):
            return super().load_from_checkpoint(
                checkpoint_path, map_location, hparams_file, strict, weights_only, **kwargs
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # `load_from_checkpoint` of a sharded_init run (export, notebooks): give the skeleton real
        # storage first (loading into meta tensors would silently do nothing). Weights are not read from
        # the hub here: the checkpoint's state dict overwrites them next.
        if self._is_skeleton():
            self.model = LlavaModel.from_spec(self.spec, load_weights=False)
            self.apply_stage()
        trainer = self._trainer
        if trainer is not None and trainer.state.fn == "fit" and trainer.max_steps != -1:
            epoch_end_as_last_batch(checkpoint)  # Lightning #19617: training/epoch_end_resume.py

    # ----------------------------------------------------------------------------------- stages
    def components(self) -> dict[str, torch.nn.Module]:
        return {
            "vision_tower": self.model.vision_tower,
            "multi_modal_projector": self.model.multi_modal_projector,
            "language_model": self.model.language_model,
        }

    def apply_stage(self) -> None:
        """Run the freezing method of `self.stage`, then log the parameter table."""
        {
            "align": self.freeze_for_align,
            "finetune": self.freeze_for_finetune,
            "full": self.freeze_for_full,
            "lora": self.freeze_for_lora,
        }[self.stage]()
        if self.unfreeze_vision_blocks:
            self._unfreeze_last_vision_blocks(self.unfreeze_vision_blocks)
        if self.gradient_checkpointing:
            self._enable_gradient_checkpointing()
        log.info("stage %r parameters:\n%s", self.stage, param_table(self.components()))

    def freeze_for_align(self) -> None:
        """Stage 1: only the projector trains; vision tower and LLM are frozen."""
        self.model.requires_grad_(False)
        self.model.multi_modal_projector.requires_grad_(True)

    def freeze_for_finetune(self) -> None:
        """Stage 2: projector and LLM train; the vision tower is frozen."""
        self.model.requires_grad_(False)
        self.model.multi_modal_projector.requires_grad_(True)
        self.model.language_model.requires_grad_(True)

    def freeze_for_full(self) -> None:
        """Everything trains (vision blocks past the deepest feature layer never run and stay frozen)."""
        self.model.requires_grad_(True)
        self._refreeze_unused_vision_blocks()

    def freeze_for_lora(self) -> None:
        """LoRA adapters on the LLM's linear layers (peft); projector fully trained; the rest frozen."""
        try:
            from peft import LoraConfig as PeftLoraConfig
            from peft import get_peft_model
        except ImportError as err:
            raise ImportError("stage 'lora' needs peft: pip install 'llava-lightning[lora]'") from err
        self.model.requires_grad_(False)
        cfg = PeftLoraConfig(
            r=self.lora_config.r,
            lora_alpha=self.lora_config.alpha,
            lora_dropout=self.lora_config.dropout,
            target_modules=self.lora_config.target_modules,
            task_type="CAUSAL_LM",
        )
        if not hasattr(self.model.language_model, "peft_config"):
            self.model.language_model = get_peft_model(self.model.language_model, cfg)
        self.model.multi_modal_projector.requires_grad_(True)

    def _unfreeze_last_vision_blocks(self, k: int) -> None:
        """Train the last k blocks that run (those up to the deepest feature layer)."""
        tower = self.model.vision_tower
        for block in tower.blocks()[: tower.blocks_run][-k:]:
            block.requires_grad_(True)

    def _refreeze_unused_vision_blocks(self) -> None:
        tower = self.model.vision_tower
        for block in tower.blocks()[tower.blocks_run :]:
            block.requires_grad_(False)
        # Parts that only serve the pooled / classifier output, which LLaVA never reads: CLIP's and
        # SigLIP's post_layernorm and pooling head, timm's final norm, fc_norm, attention pool, head.
        root = getattr(tower, "timm_model", tower)
        for name in ("post_layernorm", "head", "norm", "fc_norm", "attn_pool"):
            module = getattr(root, name, None)
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False)

    def enable_block_checkpointing(self) -> None:
        """Turn on activation checkpointing of every trained declared block (as `gradient_checkpointing=True`)."""
        self.gradient_checkpointing = True
        self._enable_gradient_checkpointing()

    def _enable_gradient_checkpointing(self) -> None:
        lm = self.model.language_model
        if any(p.requires_grad for p in lm.parameters()):
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        tower = self.model.vision_tower
        if any(p.requires_grad for p in tower.parameters()):
            if hasattr(tower, "hf_model"):
                tower.hf_model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
            elif hasattr(tower, "timm_model"):
                tower.timm_model.set_grad_checkpointing(True)

    def train(self, mode: bool = True) -> LlavaLitModule:
        """Trainable parts follow `mode`; fully frozen components stay in eval mode (dropout off)."""
        super().train(mode)
        if mode:
            for module in self.components().values():
                if not any(p.requires_grad for p in module.parameters()):
                    module.eval()
        return self

    # ----------------------------------------------------------------------------------- scaling
    def configure_model(self) -> None:
        """Under `ModelParallelStrategy` (e.g. `FSDP2Strategy`): shard the model's declared blocks, then the root."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        from .training.fsdp2 import FSDP2Strategy, shard_fsdp2

        strategy = self._trainer.strategy if self._trainer is not None else None
        if _is_zero3(strategy) and self.sharded_init and self._is_skeleton():
            self._build_under_zero_init(strategy)
            return
        if not isinstance(strategy, ModelParallelStrategy) or getattr(self, "_sharded", False):
            return
        if isinstance(strategy, FSDP2Strategy):
            strategy.shard(self.model)
        else:  # Lightning's own strategy: FSDP2 over its data-parallel dimension with the defaults
            shard_fsdp2(self.model, self.device_mesh["data_parallel"])
        if self.sharded_init:
            from .training.sharded_init import materialize_sharded

            build = self._build_model_with_init_rng if self.global_rank == 0 else None
            materialize_sharded(self.model, build, strategy.root_device)
        self._sharded = True

    # ----------------------------------------------------------------------------------- steps
    def forward(self, batch: dict[str, Any], return_logits: bool = False):
        # A frozen vision tower runs under no_grad inside `LlavaModel` (through the root module's
        # forward, which FSDP2 requires).
        return self.model(
            batch["input_ids"],
            batch["attention_mask"],
            batch.get("pixel_values"),
            batch["labels"],
            return_logits=return_logits,
        )

    def setup(self, stage: str) -> None:
        trainer = self._trainer
        if self.sharded_init and self._is_skeleton():
            if _is_fsdp1(trainer.strategy):
                # FSDP1: rank 0 holds the real weights, the others keep the skeleton; the wrapper
                # allocates their shards and copies rank 0's (sync_module_states, LlavaFSDPStrategy).
                if trainer.global_rank == 0:
                    self.model = self._build_model_with_init_rng()
                    self.apply_stage()
            elif not _inits_sharded(trainer.strategy):
                # Here, not in configure_model: DeepSpeed runs that hook under zero.Init.
                log.warning(
                    "model.sharded_init applies to FSDP2, FSDP (LlavaFSDPStrategy) and DeepSpeed ZeRO-3; "
                    "under %s every rank builds the full model",
                    type(trainer.strategy).__name__,
                )
                self.model = self._build_model_with_init_rng()
                self.apply_stage()
        self.model.tower_on_text_only = _shards_modules(trainer.strategy)
        if stage == "fit" and trainer is not None and trainer.accumulate_grad_batches > 1:
            if trainer.strategy.handles_gradient_accumulation:
                raise ValueError(
                    f"{type(trainer.strategy).__name__} runs gradient accumulation itself, so the loss of an "
                    "optimizer step cannot be the exact mean over its tokens (the step boundaries and the "
                    "loss division are the strategy's). For DeepSpeed use "
                    "llava_lightning.training.deepspeed.LlavaDeepSpeedStrategy (conf/strategy/deepspeed_*.yaml), "
                    "or set trainer.accumulate_grad_batches to 1"
                )

    def on_fit_start(self) -> None:
        self._metrics_to_device()

    def on_validation_start(self) -> None:
        self._metrics_to_device()

    def _metrics_to_device(self) -> None:
        # DeepSpeed ZeRO-3 never moves the module to the device (its engine places the partitioned
        # parameters), so the metrics' states would stay on the CPU; the other strategies moved them.
        device = self.trainer.strategy.root_device
        for child in self.children():
            if isinstance(child, Metric):
                child.to(device)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        # First, on every rank (all are at the same micro-batch): the step's token count over ranks.
        step_tokens = self._step_token_count(batch)
        if batch["input_ids"].numel() == 0:
            return self._empty_batch_loss()
        out = self(batch)
        self.train_loss.update(out.loss.detach(), weight=out.num_supervised.clamp(min=1))
        # Summed token losses over the step's token count (times what Lightning divides by and what
        # the strategy averages over): the accumulated gradient is the step's token mean.
        trainer = self.trainer
        return out.loss_sum * token_mean_scale(
            step_tokens, trainer.accumulate_grad_batches, trainer.world_size
        )

    def _sum_over_ranks(self, count: int) -> torch.Tensor:
        tokens = torch.tensor(count, dtype=torch.long, device=self.device)
        if self.trainer.world_size > 1:
            tokens = self.trainer.strategy.reduce(tokens, reduce_op="sum")
        return tokens

    def _step_token_count(self, batch: dict[str, Any]) -> torch.Tensor:
        """Supervised tokens of this micro-batch's optimizer step over all ranks (summed once per step)."""
        if STEP_TOKENS in batch:
            if batch[STEP_FIRST] or self._step_tokens is None:
                self._step_tokens = self._sum_over_ranks(int(batch[STEP_TOKENS]))
                self._logged_tokens = self._step_tokens
            return self._step_tokens
        # A loader that is not LlavaDataModule's (no look-ahead): each micro-batch is normalized by its
        # own token count, exact without accumulation, a mean of micro-batch means with it.
        if self.trainer.accumulate_grad_batches > 1 and not self._warned_unannotated:
            log.warning(
                "training batches carry no %r (the loader is not wrapped in StepTokenLoader): with "
                "gradient accumulation the loss is a mean of micro-batch token means, not the step's",
                STEP_TOKENS,
            )
            self._warned_unannotated = True
        tokens = self._sum_over_ranks(count_supervised(batch))
        self._logged_tokens = tokens if self._logged_tokens is None else self._logged_tokens + tokens
        return tokens * self.trainer.accumulate_grad_batches

    def _empty_batch_loss(self) -> torch.Tensor:
        """A zero loss for a batch whose samples were all skipped, so every rank runs the same forward
        and backward: the modules a batch with an image runs, on a dummy text sample with nothing
        supervised. (Summing the parameters instead would do for DDP, but FSDP, FSDP2 and ZeRO-3 gather
        and reduce module by module, collectively, so the other ranks would wait.)"""
        return self(self._dummy_batch()).loss_sum * 0.0

    def _dummy_batch(self) -> dict[str, Any]:
        # Text only, nothing supervised: in training, `LlavaModel.embed` runs the vision tower and the
        # projector on a blank image for a batch without images, so every module runs.
        text = 1 if self.model.image_token_id == 0 else 0  # any id but the image token's
        ids = torch.tensor([[text, text]], device=self.device)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": torch.full_like(ids, IGNORE_INDEX),
            "pixel_values": None,
        }

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Lightning's clipping, except under FSDP1, whose precision plugin refuses norm clipping: there
        the root FSDP module clips (it knows the sharded total norm)."""
        from lightning.pytorch.strategies import FSDPStrategy

        strategy = self.trainer.strategy
        if (
            gradient_clip_val
            and isinstance(strategy, FSDPStrategy)
            and gradient_clip_algorithm in (None, "norm")
        ):
            strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_before_optimizer_step(self, optimizer) -> None:
        if self._logged_tokens is not None:
            self.log("train/tokens", self._logged_tokens.float(), on_step=True, on_epoch=False)
        self.log("train/loss", self.train_loss.compute(), on_step=True, on_epoch=False, prog_bar=True)
        self.train_loss.reset()
        self._step_tokens = self._logged_tokens = None

    def on_train_epoch_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "set_epoch"):
            dm.set_epoch(self.current_epoch)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self(batch, return_logits=True)
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        predicted = out.logits[:, :-1].argmax(-1)
        self.val_loss_sum.update(out.loss_sum.detach())
        self.val_tokens.update(mask.sum())
        self.val_correct.update(((predicted == labels) & mask).sum())

    def on_validation_epoch_end(self) -> None:
        tokens = self.val_tokens.compute().clamp(min=1)
        loss = self.val_loss_sum.compute() / tokens
        split = "test" if self.trainer.testing else "val"
        self.log_dict(
            {
                f"{split}/loss": loss,
                f"{split}/ppl": torch.exp(loss),
                f"{split}/accuracy": self.val_correct.compute() / tokens,
            },
            prog_bar=True,
        )
        for metric in (self.val_loss_sum, self.val_tokens, self.val_correct):
            metric.reset()

    # `test` scores `data.test` as validation scores `data.val`, logged as test/loss, test/ppl, test/accuracy.
    test_step = validation_step
    on_test_start = on_validation_start
    on_test_epoch_end = on_validation_epoch_end

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Greedy replies for a batch of `{"id", "prompt", "images"}` lists (`LlavaDataModule.predict`)."""
        replies = generate(
            self.model,
            batch["images"],
            batch["prompt"],
            template=self.template,
            aspect=self.image_aspect,
            max_new_tokens=self.max_new_tokens,
        )
        return [{"id": i, "prompt": p, "reply": r} for i, p, r in zip(batch["id"], batch["prompt"], replies)]

    # ----------------------------------------------------------------------------------- optim
    def configure_optimizers(self):
        o = self.optim
        groups = param_groups(
            {
                "multi_modal_projector": (self.model.multi_modal_projector, o.projector_lr or o.lr),
                "vision_tower": (self.model.vision_tower, o.vision_lr or o.lr),
                "language_model": (self.model.language_model, o.lr),
            },
            o.weight_decay,
        )
        if not groups:
            raise ValueError(f"stage {self.stage!r} leaves nothing to train")
        # A strategy may need its own optimizer class (DeepSpeed's CPU AdamW when it offloads the optimizer).
        make = getattr(self.trainer.strategy, "make_optimizer", None) or torch.optim.AdamW
        optimizer = make(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        fit_loop = self.trainer.fit_loop
        built_before = fit_loop._combined_loader is not None
        total = self.trainer.estimated_stepping_batches
        if total == float("inf"):
            raise ValueError(
                "the schedule needs the number of optimizer steps, but the training data has no length "
                "(streamed caption shards without epoch_length): set trainer.max_steps, or the source's "
                "resampled: true with epoch_length"
            )
        total = max(1, int(total))
        if not built_before:
            # Sharp edge: with max_epochs set, `estimated_stepping_batches` builds the train loader
            # (fit_loop.setup_data) before Lightning restores a checkpoint's loop state, and setup_data
            # does not run again, so a resumed run would restart the epoch's data from its first
            # batch. Dropping the early loader makes Lightning build it again after the restore (and
            # costs one extra loader construction at start).
            fit_loop._combined_loader = None
        scheduler = warmup_cosine(optimizer, total, o.warmup_ratio, o.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------------------------- artifacts
    def on_train_end(self) -> None:
        if self.stage == "align" and self.projector_artifact:
            # Every rank gathers (a collective under sharding); rank 0 writes.
            state = self.projector_state()
            if self.trainer.is_global_zero:
                root = Path(self.trainer.log_dir or self.trainer.default_root_dir)
                self.save_projector(root / f"{self.projector_artifact}.safetensors", state)

    def projector_state(self) -> dict[str, torch.Tensor]:
        """The projector's full weights on CPU, gathered from shards where a strategy split them (FSDP2
        DTensors, FSDP1 flat parameters, ZeRO-3 partitions). Under a sharded strategy every rank must
        call it."""
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
        from torch.distributed.tensor import DTensor

        projector = self.model.multi_modal_projector
        strategy = self._trainer.strategy if self._trainer is not None else None
        gather = contextlib.nullcontext()
        if isinstance(strategy, FSDPStrategy):
            from torch.distributed.fsdp import FullyShardedDataParallel

            gather = FullyShardedDataParallel.summon_full_params(strategy.model, writeback=False)
        elif isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(list(projector.parameters()))
        with gather:
            return {
                k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone().contiguous()
                for k, v in projector.state_dict().items()
            }

    def save_projector(self, path: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the projector (safetensors) and a JSON describing it; `init_projector` reads it back.
        `state`: the weights from `projector_state()` (gathered on every rank under sharding)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(self.projector_state() if state is None else state, str(path))
        meta = {
            "projector": self.model.projector_type,
            "vision": asdict(self.spec.vision),
            "language": asdict(self.spec.language),
            "global_step": int(self.global_step),
        }
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2, default=str))
        log.info("projector artifact written to %s", path)
        return path
