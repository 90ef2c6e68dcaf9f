"""The LoRA trainer of a base's denoiser (its family says how to feed it and what it learns), on accelerate.

`train()` checks the run folder and records the run's status; `_train` then reads top to bottom in one screen, each
stage a method of `Training`, which holds the run's state: prepare the data (encoded once, cached), build the model
with its LoRA, optimizer and schedule, restore a checkpoint, then one linear loop, then save the LoRA. All randomness
of the loop (data order, caption orders and dropout, class examples, latent draws, noise, timesteps) comes from one
CPU generator whose state is saved in every checkpoint, with the optimizer's and the moving average's, so a resumed
run ends with exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from rich.console import Console
from torch.nn.attention import SDPBackend

from lookalike import __version__, display
from lookalike.config import StudyConfig
from lookalike.data.dataset import mirrored, training_images, training_size
from lookalike.display import cell
from lookalike.errors import LookalikeError, filesystem_problem
from lookalike.generate import render
from lookalike.models.base import guidance_scales, load_component, text_encoding, training_resolution, training_sides
from lookalike.models.checkpoint import RECORD, trained_base_folder
from lookalike.models.families import folder_family
from lookalike.models.families.interface import TextEncoding
from lookalike.models.lora import add_lora, full_tensor, lora_state_dict, save_lora, share_lora_inputs
from lookalike.models.quantize import check_quantization
from lookalike.processes import identity
from lookalike.progress import progress_bar
from lookalike.store import record_run
from lookalike.train.attention import TRAINING_ATTENTION, fastest_exact, training_attention
from lookalike.train.batches import BatchOrder, batch_order
from lookalike.train.cache import EmbeddingCache
from lookalike.train.caption_draws import CaptionDraws
from lookalike.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from lookalike.train.compilation import compiles
from lookalike.train.face_weights import batch_weights, photo_weights
from lookalike.train.fp8 import convert_to_fp8_compute, fp8_problem
from lookalike.train.held_base import HeldBase, base_key
from lookalike.train.init_lora import keep_copy, read_start, start_from
from lookalike.train.memory import out_of_memory_message
from lookalike.train.objectives import FlowMatching, family_objective, with_prior
from lookalike.train.offload import BlockOffload
from lookalike.train.preservation import preservation_loss, preserved_caption
from lookalike.train.prior import class_images
from lookalike.train.reference_recipe import recipe_line, with_reference_recipe
from lookalike.train.sample_scores import SampleScores, stop_reason
from lookalike.train.sharding import load_optimizer_state, optimizer_state, shard_transformer
from lookalike.train.text_encoders import TrainedTextEncoders, check_trainable
from lookalike.train.tread import TokenRoute
from lookalike.trained_on import (
    changed_settings,
    checkpoint_changed,
    class_photo_changes,
    extended_from,
    photo_changes,
    record_class_photos,
    record_photos,
    stale_reason,
    trains_on,
)
from lookalike.workspace import RunPaths, StepLog, Workspace, atomic_path, read_json, read_metrics, write_json


def resolve_mixed_precision(setting: str) -> str:
    """'auto' is bf16 on a GPU that has it and full precision elsewhere; half precision needs a GPU."""
    cuda = torch.cuda.is_available()
    if setting == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if setting == "fp16" and not cuda:
        raise LookalikeError("train.mixed_precision = 'fp16' needs a CUDA GPU; use 'no' or 'bf16' on the CPU")
    return setting


def parameter_groups(model, t) -> list[dict[str, Any]]:
    """The trained parameters as the optimizer's groups: one at the learning rate, or with LoRA+ (loraplus_lr_ratio)
    the B (up) matrices in a second group at the learning rate times the ratio."""
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if t.loraplus_lr_ratio is None:
        return [{"params": [p for _, p in trained]}]
    up = [p for name, p in trained if ".lora_B." in name]
    return [{"params": [p for name, p in trained if ".lora_B." not in name]},
            {"params": up, "lr": t.learning_rate * t.loraplus_lr_ratio}]


def make_optimizer(config: StudyConfig, params: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """The optimizer over these parameter groups (a group without its own lr takes train.learning_rate)."""
    t = config.train
    if t.optimizer == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:
            bitsandbytes = None
        if bitsandbytes is None or not torch.cuda.is_available():
            raise LookalikeError("train.optimizer = 'adamw8bit' needs bitsandbytes and a CUDA GPU; use 'adamw'")
        return bitsandbytes.optim.AdamW8bit(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    if t.optimizer == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)


def make_scheduler(t, optimizer: torch.optim.Optimizer, processes: int):
    """train.lr_scheduler after train.lr_warmup_steps' warm-up, by diffusers' get_scheduler as its reference
    scripts call it. accelerate steps a prepared scheduler once per process, hence the scaling by their number."""
    from diffusers.optimization import get_scheduler

    name = "constant_with_warmup" if t.lr_scheduler == "constant" else t.lr_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=t.lr_warmup_steps * processes,
                         num_training_steps=t.max_train_steps * processes, num_cycles=t.lr_num_cycles,
                         power=t.lr_power)


@contextlib.contextmanager
def averaged_weights(ema, params):
    """The LoRA's parameters hold the moving average meanwhile (when train.ema_decay keeps one), then their own
    values again, bit for bit."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def enable_checkpointing(transformer, family, every: int) -> None:
    """Keep only the inputs of every `every`-th block of the denoiser (the kinds its family names) and recompute
    its activations in the backward pass: memory traded for time, block by block (every=1: all blocks; 2: half of
    them; ...)."""
    kinds = family.checkpointed_block_types(transformer)
    blocks = [module for module in transformer.modules() if type(module).__name__ in kinds]
    chosen = {id(block) for index, block in enumerate(blocks) if index % every == 0}

    def checkpointed(block, *args):
        if id(block) in chosen:
            return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)
        return block(*args)

    transformer.enable_gradient_checkpointing(gradient_checkpointing_func=checkpointed)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kilobytes


def _check_run_folder(run: RunPaths, config: StudyConfig, resume: bool) -> bool:
    """True if the run is already done. A started run continues only with --resume and the same config, or with
    more steps and nothing else changed (trained on: trained_on.extended_from)."""
    status = run.read_status()
    if (status is None or status["state"] == "pending") and not run.config.exists():
        return False
    if _stopped_before_its_first_step(run, status):
        return False  # nothing of it to keep or to match: it starts again, on the config given now
    if not resume:
        if status and status["state"] == "done" and run.lora.is_file():
            return True
        raise LookalikeError(f"run {run.name!r} already exists in {run.root}: add --resume to continue it, "
                             "or choose another --run name")
    if run.config.exists():
        if extended_from(run, config) is not None:  # trained on to more steps: not done
            return False
        # Only what shapes the weights must match. A key added to lookalike since the run started reads as its
        # default there.
        changed = changed_settings(run, config)
        if changed:
            raise LookalikeError(f"cannot resume run {run.name!r}: its config differs in {', '.join(changed)} "
                                 "(start a new --run instead)")
    return bool(status and status["state"] == "done" and run.lora.is_file())


def _stopped_before_its_first_step(run: RunPaths, status: dict | None) -> bool:
    """A run that failed, or was killed, before it trained a step (a bad model.checkpoint, a layer_filter that
    matches nothing, a bad init_lora): it holds no weights, so its name is not used up by the mistake. Only asked
    while this process holds the run, so a status that says running is of a process that is gone."""
    return (status is not None and status["state"] in ("failed", "running") and not run.lora.is_file()
            and not read_metrics(run.metrics) and not list_checkpoints(run.checkpoints))


def _keep_shorter_lora(run: RunPaths, config: StudyConfig, console: Console) -> None:
    """Before a finished run is trained on to more steps: its LoRA stays, as the LoRA of that step."""
    steps = extended_from(run, config) if run.config.exists() else None
    if steps is None:
        return
    kept = ""
    if run.lora.is_file():
        with atomic_path(run.step_lora(steps)) as tmp:
            shutil.copyfile(run.lora, tmp)
        kept = f"; its {steps}-step LoRA stays as {run.step_lora(steps).name} (--checkpoint {steps})"
    console.print(f"train: run {run.name!r} now trains for {config.train.max_train_steps} steps instead of {steps}"
                  f"{kept}")


def _stop_if_not_finite(step: int, loss: float, checkpoints: Path, params=()) -> None:
    """A NaN or infinite loss (or LoRA weight) ruins every later step: stop the run there, as failed, naming the
    step and the checkpoint a resume would start from."""
    broken = not math.isfinite(loss) or any(not torch.isfinite(p).all() for p in params)
    if not broken:
        return

    good = list_checkpoints(checkpoints)
    what = f"the loss became {loss}" if not math.isfinite(loss) else "the LoRA weights became NaN or infinite"
    raise LookalikeError(f"{what} at step {step}, so the run stopped there (last good checkpoint: "
                        f"{good[-1].name if good else 'none'}); lower train.learning_rate, then start a new --run")


def train(config: StudyConfig, run_name: str = "default", resume: bool = False,
          console: Console | None = None, held: HeldBase | None = None) -> Path:
    """Train one LoRA run; return the path of its lora.safetensors. Under torchrun or `accelerate launch`
    every process runs this; only the main one writes the run's files, and holds the run (a second process
    asked to train it meanwhile stops with RunBusy). `held`: a warm sweep worker's base, lent to the run and
    given back when it ends well."""
    from accelerate import PartialState

    # One process, or this process's rank when launched distributed (gloo between CPU processes).
    state = PartialState(cpu=not torch.cuda.is_available())
    run = Workspace(config.workspace).run(run_name)
    with run.hold() if state.is_main_process else contextlib.nullcontext():
        return _train_held(config, run, resume, console or display.console(), state, held)


def _train_held(config: StudyConfig, run: RunPaths, resume: bool, console: Console, state,
                held: HeldBase | None) -> Path:
    main = state.is_main_process
    done = _check_run_folder(run, config, resume)
    state.wait_for_everyone()  # every rank has looked at the run folder before the main one writes to it
    if done:
        stale = None
        if main:  # say so when it was trained on other settings or photos than these
            stale = stale_reason(run, config, training_images(config, display.console(quiet=True)), config.workspace)
            run.mark_stale(stale)
        hint = f"; add --resume to train it on to {config.train.max_train_steps} steps" \
            if trains_on(run, config) else ""
        console.print(f"train: run {run.name!r} is already done: {run.lora}" + (f"; {stale}" if stale else "") + hint)
        return run.lora
    before = run.seconds_so_far()
    started = time.time()
    if main:
        if _stopped_before_its_first_step(run, run.read_status()):  # what its first try wrote is of another config
            for leftover in (run.checkpoint_record, run.init_lora, run.photos, run.class_photos):
                leftover.unlink(missing_ok=True)
        run.root.mkdir(parents=True, exist_ok=True)
        run.remove_temporary_files()
        _keep_shorter_lora(run, config, console)  # before the saved config becomes the new one
        write_json(run.config, config.to_json_dict())
        run.write_status("running", **identity(), started=started, seconds_before=before)

    def failed(reason: str) -> None:
        if main:
            run.write_status("failed", reason=reason, resumable=True,
                             seconds=round(before + time.time() - started, 2))

    try:
        with training_attention():
            result = _train(config, run, resume, console, held)
        if main:
            run.write_status("done", seconds=round(before + time.time() - started, 2), **result)
    except KeyboardInterrupt:
        failed("interrupted")
        raise
    except torch.OutOfMemoryError:
        message = out_of_memory_message(config, resolve_mixed_precision(config.train.mixed_precision),
                                        state.num_processes)
        failed(message)
        raise LookalikeError(message) from None
    except BaseException as error:
        failed(str(error) if isinstance(error, LookalikeError)
               else filesystem_problem(error) or f"{type(error).__name__}: {error}")
        raise
    finally:
        if main:
            record_run(Workspace(config.workspace).results, run)
    console.print(f"train: run {run.name!r} done: {run.lora}")
    return run.lora


def _train(config: StudyConfig, run: RunPaths, resume: bool, console: Console,
           held: HeldBase | None = None) -> dict[str, Any]:
    """One run's training, stage by stage (each a method of Training): the run's photos, captions and settings;
    the denoiser with its LoRA and optimizer; the state a checkpoint restores; then the loop, one optimizer step
    an iteration; then the LoRA."""
    training = Training(config, run, console, held)
    training.prepare_data(resume)
    training.build_model()
    training.restore()
    training.choose_attention()
    t = training.t
    with training_attention(training.attention), \
            progress_bar(console, f"train {run.name}", total=t.max_train_steps, completed=training.start_step) as bar:
        for step in range(training.start_step + 1, t.max_train_steps + 1):
            started = time.perf_counter()
            for _ in range(t.gradient_accumulation_steps):
                with training.accelerator.accumulate(training.transformer):
                    training.optimize(training.batch_loss())
            if not training.after_step(step, started, bar):
                break
    result = training.save()
    training.give_back_base()
    return result


class Training:
    """A run's training state (accelerator, data and its cached encodings, the denoiser with its LoRA, optimizer,
    schedule, moving average, random generator and batch orders) and the stages that make and use it. Every random
    number of the loop comes from `generator`, whose state every checkpoint keeps, so a resumed run ends with
    exactly the weights of an uninterrupted one."""

    def __init__(self, config: StudyConfig, run: RunPaths, console: Console, held: HeldBase | None = None):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState

        self.config, self.run, self.console = config, run, console
        # A warm worker's base, lent to this run; an offloaded or sharded base is changed past undoing: loaded anew.
        self.held = held if held is not None and not (config.train.offload or config.train.shard) else None
        self.t = t = config.train
        self.precision = resolve_mixed_precision(t.mixed_precision)
        check_quantization(t.base_quantization)
        # accelerate keeps one mixed precision per process and refuses another: a second run in the same process
        # (the demo, tests, a notebook) starts from a fresh state. The process group (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
        self.accelerator = Accelerator(mixed_precision=self.precision,
                                       gradient_accumulation_steps=t.gradient_accumulation_steps,
                                       cpu=not torch.cuda.is_available())
        self.device = self.accelerator.device
        self.processes, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.sharded = t.shard
        if self.sharded and t.ema_decay:
            raise LookalikeError("train.ema_decay averages whole LoRA weights, and train.shard splits them across "
                                 "processes: choose one")
        if self.sharded and self.processes == 1:
            raise LookalikeError("train.shard = true splits the model across processes, and this run has one: "
                                 "train with --processes N (or under torchrun / accelerate launch), or set "
                                 "train.shard = false")
        if t.fp8_compute:
            problem = fp8_problem(self.precision, torch.cuda.get_device_capability(self.device)
                                  if self.device.type == "cuda" else None)
            if problem:
                raise LookalikeError(problem)
        self.weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)
        self.loss_value = float("nan")
        self.latest: dict[str, str] = {}  # the latest sample step's identity and CLIP Score, beside the loss
        self.first_step: dict[str, str] = {}  # a compiled run's first step, which compiles, beside them
        self.stopped: dict[str, Any] = {}  # where and why train.stop_when stopped the run

    # 1. The photos, captions and class images, checked against what a resumed run trained on; their latents and
    # text embeddings encoded once (cached on disk), the encoders gone before the loop starts.
    def prepare_data(self, resume: bool) -> None:
        config, run, t, accelerator, console = self.config, self.run, self.t, self.accelerator, self.console
        # The main process prepares, downloads or builds the base, and caches; the others then read. (A tiny model
        # built by another rank would lack its text encoder's weights: transformers saves them on rank 0 only.)
        with accelerator.main_process_first():
            images = training_images(config, console)  # bad photo folders fail before any model is loaded
            self.folder = folder = trained_base_folder(config)
            if t.train_text_encoder:
                check_trainable(folder_family(folder))
            self.checkpoints = list_checkpoints(run.checkpoints) if resume else []
            # The LoRA a new run starts from (a resumed one's weights are its checkpoint's), kept in the run's
            # folder and checked before anything slow is made.
            self.start = None
            if t.init_lora is not None and not self.checkpoints:
                own_copy = keep_copy(t.init_lora, run) if accelerator.is_main_process else run.init_lora
                self.start = read_start(own_copy, t.init_lora, t.rank, config.model.base, t.train_text_encoder)
            self.class_examples = class_images(config, console)  # prior preservation's, drawn once by the base
        self._check_resumable(images)
        if accelerator.is_main_process:
            record_photos(run, images, config.workspace)
            record_class_photos(run, config)
            if config.model.checkpoint is not None:
                write_json(run.checkpoint_record, read_json(folder / RECORD))
        if t.flip:  # each photo mirrored too: an example of its own, encoded from the mirrored pixels
            images = images + [mirrored(image) for image in images]
        self.family = family = folder_family(folder)
        self.text = text_encoding(config.model)
        # Each photo's size in this run: one square, or ([data] buckets) its aspect ratio's bucket; with
        # train.extra_resolutions, an example of each photo at each side.
        multiple = family.pixel_multiple(read_json(folder / family.denoiser / "config.json"))
        sides = training_sides(config)
        for side in sides:
            if side % multiple:
                raise LookalikeError(f"train.resolution: the run trains at {side} px ([train] resolution, else "
                                     f"[data] resolution, and train.extra_resolutions), and {config.model.base} "
                                     f"takes sides that are multiples of {multiple} px: set one that is")
        self.sizes = [training_size(image, side, multiple) for side in sides for image in images]
        self.images = images = [image for _ in sides for image in images]

        cache = EmbeddingCache(Workspace(config.workspace).cache, folder, self.device, self.weight_dtype,
                               offload=t.offload)
        self.sample_prompts = [config.fill(p) for p in t.sample_prompts] if t.sample_every else []
        with accelerator.main_process_first():
            self.latents = cache.latents(images, self.sizes)
            # Class examples join subject batches of every size: each class image fitted to each size.
            self.class_latents = {size: cache.latents(self.class_examples, [size] * len(self.class_examples))
                                  for size in dict.fromkeys(self.sizes)}
            negative = [family.negative_prompt] if self.sample_prompts and family.negative_prompt is not None else []
            self.subject_captions = CaptionDraws([image.caption for image in images], t.tag_shuffle,
                                                 t.caption_dropout, t.seed)
            # train.output_preservation: each caption a subject example may train with, its trigger words made
            # class words
            self.preserved = {caption: preserved_caption(caption, config.people)
                              for caption in self.subject_captions.texts()} if t.output_preservation else {}
            self.texts = None
            if not t.train_text_encoder:  # else encoded at every step, by the text encoders as they learn
                self.texts = cache.texts(self.subject_captions.texts() + [image.caption for image in
                                                                          self.class_examples]
                                         + self.sample_prompts + negative + list(self.preserved.values()),
                                         self.text)
        if self.processes > 1 and accelerator.is_main_process:
            console.print(f"train: {self.processes} processes x batch {t.batch_size} x accumulation "
                          f"{t.gradient_accumulation_steps} = effective batch "
                          f"{self.processes * t.batch_size * t.gradient_accumulation_steps}; learning rate "
                          f"{t.learning_rate:g} (not scaled with the batch)"
                          + (f"; sharded: each process holds 1/{self.processes} of the model, LoRA and optimizer "
                             "state" if self.sharded else ""))
        self.normalisation = family.latent_normalisation(folder)
        self.objective = family_objective(family, folder)
        self.t = t = with_reference_recipe(t, family, folder)  # the keys left unset: the base's reference script's
        if isinstance(self.objective, FlowMatching) and accelerator.is_main_process:
            console.print(f"train: {recipe_line(t)}")
        self.face_weights = photo_weights(images, self.sizes, self.latents, t.background_loss_weight) \
            if t.background_loss_weight < 1 else None

    def _check_resumable(self, images) -> None:
        """A resumed run goes on only with the photos, class images and fine-tune it started with."""
        run, config = self.run, self.config
        if not self.checkpoints:
            return
        changes = photo_changes(run, images, config.workspace)
        if changes:
            raise LookalikeError(f"cannot resume run {run.name!r}: its photos changed since it started: {changes}; "
                                 "put them back and resume it (`lookalike sweep --retry-failed` or `train "
                                 "--resume`), or start a new --run")
        classes = class_photo_changes(run, config)
        if classes:
            raise LookalikeError(f"cannot resume run {run.name!r}: its class images (prior.images) changed since it "
                                 f"started: {classes}; put them back and resume it, or start a new --run")
        if checkpoint_changed(run, config):
            raise LookalikeError(f"cannot resume run {run.name!r}: model.checkpoint {config.model.checkpoint} "
                                 "changed since it started; put the file back and resume it, or start a new --run")

    # 2. The frozen denoiser (transformer or UNet) with a trainable LoRA, its optimizer and schedule; LoRA weights
    # stay in float32 under mixed precision. A sharded one stays on the CPU until its shards move to each device.
    def build_model(self) -> None:
        from peft.utils import set_peft_model_state_dict

        t, family, device, console = self.t, self.family, self.device, self.console
        def load():
            return load_component(self.folder, family.denoiser, dtype=self.weight_dtype,
                                  quantization=t.base_quantization)

        if self.held is not None:
            key = base_key(self.folder, family.denoiser, self.weight_dtype, t.base_quantization)
            if self.held.holds(key):
                console.print(f"train: the {family.denoiser} is the one this worker loaded for its last run")
            transformer = self.held.take(key, load)
        else:
            transformer = load()
        # Sharded, or offloaded block by block: the whole model never goes to the device (peft initialises a LoRA
        # on the CPU wherever its base layer is, so the same seed gives the same LoRA either way).
        transformer = transformer if self.sharded or t.offload else transformer.to(device)
        if t.fp8_compute:  # the float8 layers first: the LoRA wraps them (the scripts' order)
            converted = convert_to_fp8_compute(transformer)
            if not converted:
                raise LookalikeError(f"train.fp8_compute = true: no linear layer of {self.config.model.base}'s "
                                     f"{family.denoiser} has sides that are multiples of 16, as float8 matmuls "
                                     "need: leave fp8_compute unset")
            console.print(f"train: {converted} linear layers of the {family.denoiser} compute in float8")
        torch.manual_seed(t.seed)  # the LoRA's random initialisation: the same seed gives the same run
        add_lora(transformer, t.rank, t.lora_alpha, t.target_modules, t.lora_dropout, t.adapter, t.lokr_factor,
                 t.layer_filter)
        for p in transformer.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        if self.precision != "no" and t.adapter == "lora" and not t.lora_dropout:
            share_lora_inputs(transformer)  # the same values, fewer activations kept (models/lora.py)
        self.text_encoders = None
        if t.train_text_encoder:
            self.texts = self.text_encoders = TrainedTextEncoders(self.folder, family, t, device, self.weight_dtype,
                                                                  self.text)
        if self.start is not None:
            layers = start_from(transformer, family.denoiser, self.start, t.init_lora, t.rank, t.lora_alpha,
                                self.text_encoders.encoders if self.text_encoders is not None else None)
            console.print(f"train: starting from the LoRA {t.init_lora} ({layers} layers)")
        if t.offload:
            if self.processes > 1:
                raise LookalikeError("train.offload = true trains in one process: set it false to train with "
                                     "several")
            offload = BlockOffload(transformer, family.checkpointed_block_types(transformer), device)
            transformer = transformer.to(device)  # the LoRA and what lies outside the blocks
            console.print(f"train: the frozen weights of the {family.denoiser}'s blocks ("
                          f"{offload.offloaded_parameters / 1e6:,.0f} M parameters) stay in CPU memory, each block's "
                          "brought to the device while it runs")
        # A resumed run's LoRA weights, set while the model is whole (before it is sharded or wrapped).
        lora, self.state = load_checkpoint(self.checkpoints[-1]) if self.checkpoints else (None, None)
        if lora is not None:
            set_peft_model_state_dict(transformer, {k.removeprefix(f"{family.denoiser}."): v
                                                    for k, v in lora.items() if k.startswith(f"{family.denoiser}.")})
            if self.text_encoders is not None:
                self.text_encoders.load_lora(lora)
        if t.gradient_checkpointing and not t.offload:  # offloaded blocks are checkpointed by the offload
            enable_checkpointing(transformer, family, t.gradient_checkpointing_every)
        self.route = None
        if t.tread_ratio is not None:
            layout = family.route_layout(transformer)
            if layout is None:
                raise LookalikeError(f"train.tread_ratio: token routing is not built for the blocks of "
                                     f"{self.config.model.base} ({family.title}): leave tread_ratio unset")
            self.route = TokenRoute(layout, t.tread_ratio, *t.tread_blocks)
            console.print(f"train: {t.tread_ratio:g} of the image tokens skip blocks {self.route.first} to "
                          f"{self.route.last} of {len(layout.blocks)} at each step (train.tread_ratio)")
        self.compiled = compiles(t, device.type)
        if self.compiled:
            transformer.compile_repeated_blocks(fullgraph=True)
            console.print(f"train: the {family.denoiser}'s repeated blocks compile at the first step (train.compile"
                          f"{' = auto: a GPU run of 1,000 steps or more' if t.compile == 'auto' else ''})")
        if self.sharded:
            shard_transformer(transformer, self.weight_dtype, device)
        groups = parameter_groups(transformer, t)
        if self.text_encoders is not None:
            groups.append({"params": self.text_encoders.parameters(), "lr": t.text_encoder_lr or t.learning_rate})
        self.params = [p for group in groups for p in group["params"]]
        optimizer = make_optimizer(self.config, groups)
        scheduler = make_scheduler(t, optimizer, self.accelerator.num_processes)
        if self.sharded:  # sharding reduces the gradients itself: accelerate wraps no data-parallel layer around it
            optimizer, scheduler = self.accelerator.prepare(optimizer, scheduler)
        else:
            transformer, optimizer, scheduler = self.accelerator.prepare(transformer, optimizer, scheduler)
        self.transformer, self.optimizer, self.scheduler = transformer, optimizer, scheduler
        self.model = self.accelerator.unwrap_model(transformer)
        # Training mode, as the scripts set it at each epoch: the LoRA's dropout and token routing act only in it
        # (a loaded model is in eval mode; samples switch to eval and back).
        self.model.train()
        self.ema = None
        if t.ema_decay:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.params, decay=t.ema_decay)

    # 3. The loop's random generator and batch orders, restored from the latest checkpoint with every other piece
    # of state the loop depends on. Every process draws the same random numbers for the whole global batch and
    # trains on its own slice of it, so N processes of batch b train exactly as one process of batch N x b would.
    def restore(self) -> None:
        t, processes, state, accelerator = self.t, self.processes, self.state, self.accelerator
        self.generator = torch.Generator("cpu").manual_seed(t.seed)
        self.order = batch_order(self.sizes, t.batch_size * processes)
        # With prior preservation every step also draws as many class examples, from their own order.
        self.class_order = BatchOrder(len(self.class_examples), t.batch_size * processes) \
            if self.class_examples else None
        mine = slice(self.rank * t.batch_size, (self.rank + 1) * t.batch_size)
        # This process's rows of the global batch: its subject examples, then (prior preservation) its class ones.
        rows = list(range(processes * t.batch_size))[mine]
        self.rows = rows + ([processes * t.batch_size + row for row in rows] if self.class_examples else [])
        self.start_step = 0
        if state is not None:
            if self.sharded:
                load_optimizer_state(self.model, self.optimizer.optimizer, state["optimizer"])
            else:
                self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.generator.set_state(state["generator"])
            self.order.load_state_dict(state["order"])
            if self.class_order is not None:
                self.class_order.load_state_dict(state["class_order"])
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            self.start_step = state["step"]
            self.console.print(f"train: resuming {self.run.name!r} from step {self.start_step} "
                               f"({self.checkpoints[-1].name})")
        self.metrics = StepLog(self.run.metrics, self.start_step) if accelerator.is_main_process else None
        self.vae = load_component(self.folder, "vae", dtype=self.weight_dtype).to(self.device) \
            if t.sample_every else None
        self.scoring = bool(t.sample_every and t.score_samples)
        self.scores = SampleScores(self.config, self.run, self.start_step) \
            if self.scoring and accelerator.is_main_process else None

    def choose_attention(self) -> None:
        """On one GPU, the exact attention kernels in the order of their speed at this run's shape (a resumed run
        keeps the order it started with, so that it computes as the uninterrupted run did); elsewhere, and for a
        UNet (whose attention shapes differ by level), PyTorch's order without cuDNN."""
        self.attention = TRAINING_ATTENTION
        if self.device.type != "cuda" or self.processes > 1:  # several processes: one order for all, PyTorch's
            return
        if self.state is not None and "attention" in self.state:
            self.attention = [getattr(SDPBackend, name) for name in self.state["attention"]]
            return
        heads, head_dim = (self.model.config.get(key) for key in ("num_attention_heads", "attention_head_dim"))
        if not (isinstance(heads, int) and isinstance(head_dim, int)):
            return
        side = training_resolution(self.config) // self.family.pixel_multiple(self.model.config)
        tokens = side * side + self.text.tokens
        self.attention, found = fastest_exact(heads, head_dim, tokens, self.device, self.weight_dtype)
        self.console.print(f"train: attention, fastest first at {tokens} tokens: {self.attention[0].name} ("
                           + "; ".join(f"{name} {what}" for name, what in found.items()) + ")")

    # 4. One micro-batch's loss: the examples drawn, their latents noised, the denoiser's prediction against its
    # objective's target (with prior preservation's class term and output preservation's where asked).
    def batch_loss(self) -> torch.Tensor:
        t, family, generator, rows, objective = self.t, self.family, self.generator, self.rows, self.objective
        if t.lora_dropout:  # dropout draws from torch's own generator: seeded from the run's, so that a resumed run
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))  # drops as an uninterrupted one
        picked = self.order.next(generator)
        captions = self.subject_captions.draw([self.images[i].caption for i in picked], generator)
        examples = [(self.latents[i], caption) for i, caption in zip(picked, captions)]
        if self.class_order is not None:
            examples += [(self.class_latents[self.sizes[picked[0]]][i], self.class_examples[i].caption)
                         for i in self.class_order.next(generator)]
        x0 = torch.stack([stats.latent(generator, t.vae_posterior) for stats, _ in examples])
        weights = None if self.face_weights is None else batch_weights(
            family, [self.face_weights[i] for i in picked] + [None] * (len(examples) - len(picked)),
            x0.shape[1:])[rows]
        x0, layout = family.model_input(x0, self.normalisation)
        noise, levels = objective.draw(x0.shape, generator, t)
        x0, noise, levels = x0[rows], noise[rows], levels[rows]
        noisy = objective.noisy(x0, noise, levels)
        subject_rows = len(rows) // 2 if self.class_order is not None else len(rows)  # the first ones
        texts = self.texts
        noisy_in, levels_in, texts_in = noisy, levels, [texts[examples[row][1]] for row in rows]
        if self.preserved:  # the subject's rows again with their preserved captions, in the same forward
            preserved_texts = [texts[self.preserved[examples[row][1]]] for row in rows[:subject_rows]]
            noisy_in = torch.cat([noisy, noisy[:subject_rows]])
            levels_in = torch.cat([levels, levels[:subject_rows]])
            texts_in = texts_in + preserved_texts
        if self.route is not None:
            self.route.next_forward(generator)
        prediction = family.predict(self.transformer, self.model.config, noisy_in, levels_in, texts_in, t.guidance,
                                    layout, self.device, self.weight_dtype)
        prediction, kept = prediction[:len(rows)], prediction[len(rows):]
        if self.class_order is None:
            loss = objective.loss(prediction, x0, noise, levels, t, weights)
        else:
            loss = with_prior(objective, prediction, x0, noise, levels, t, subject_rows, self.config.prior.weight,
                              weights)
        if self.preserved:
            loss = loss + t.output_preservation * preservation_loss(
                family, self.transformer, self.model, noisy[:subject_rows], levels[:subject_rows], preserved_texts,
                kept, t.guidance, layout, self.device, self.weight_dtype)
        self.loss = loss
        return loss

    def optimize(self, loss: torch.Tensor) -> None:
        """The backward pass, and the optimizer's step where the accumulation ends."""
        accelerator = self.accelerator
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            if self.text_encoders is not None and self.processes > 1:  # outside the denoiser's data parallelism
                self.text_encoders.average_gradients(accelerator)
            accelerator.clip_grad_norm_(self.params, self.t.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None and accelerator.sync_gradients:  # once per optimizer step
            self.ema.step(self.params)

    # 5. After each step: its metrics; then samples, their scores and the stopping rule, before the step's
    # checkpoint (a run killed between the two resumes from the checkpoint before and makes them again, never skips
    # them). False: the stopping rule stopped the run.
    def after_step(self, step: int, started: float, bar) -> bool:
        t, accelerator, run, device = self.t, self.accelerator, self.run, self.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started  # the step's time, its GPU work finished
        self.loss_value = accelerator.gather(self.loss.detach()).mean().item()
        lr = self.scheduler.get_last_lr()[0]
        if self.metrics is not None:
            self.metrics.write({"step": step, "time": time.time(), "loss": self.loss_value, "lr": lr,
                                "s_per_step": round(seconds, 5), "peak_memory_mb": round(peak_memory_mb(device), 1),
                                "epoch": self.order.epoch})
        if self.compiled and step == self.start_step + 1:  # its compile's cost, shown in every progress line after
            self.first_step = {"first step": f"{seconds:.1f}s (compiling)"}
        bar.update(loss=f"{self.loss_value:.4f}", lr=f"{lr:.2e}", **self.latest, **self.first_step)
        _stop_if_not_finite(step, self.loss_value, run.checkpoints)
        if (accelerator.is_main_process or self.sharded) and t.sample_every and step % t.sample_every == 0:
            self._samples(step)
        if t.stop_when is not None and step % t.sample_every == 0 and step < t.max_train_steps:
            reason = stop_reason(self.scores.records, t.stop_when) if self.scores is not None else None
            # Judged by the main process, which scores; every process stops at the same step.
            if accelerator.gather(torch.tensor([float(reason is not None)], device=device)).max().item():
                self.stopped = {"stopped_at": step, "stop_reason": reason}
                self.console.print(f"train: run {run.name!r} stopped early at step {step}: {reason}")
                return False
        if t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.max_train_steps:
            _stop_if_not_finite(step, self.loss_value, run.checkpoints, self.whole_params())  # every rank: together
            if accelerator.is_main_process or self.sharded:  # gathering a sharded state takes every process
                checkpoint = self.lora_tensors(), self.training_state(step)
            if accelerator.is_main_process:
                save_checkpoint(run.checkpoints, step, *checkpoint, t.checkpoints_keep)
        return True

    def _samples(self, step: int) -> None:
        """The step's samples and, where the run scores them, their scores. A sharded transformer draws with every
        process (each forward gathers its blocks); the main one writes the images. With an EMA, the samples (and so
        the best step) are the average's."""
        with averaged_weights(self.ema, self.params):
            samples = _save_samples(self.config, self.run, step, self.model, self.vae, self.folder, self.family,
                                    self.texts, self.sample_prompts, self.text,
                                    write=self.accelerator.is_main_process)
            tensors = self.lora_tensors() if self.scoring else None  # every process of a sharded run gathers
        if self.scores is not None:
            record = self.scores.record(step, samples, self.sample_prompts,
                                        lambda path: self.lora_file(path, tensors, step))
            self.latest = {"identity": cell(record["identity_similarity"]), "clip": cell(record["clip_score"])}

    # 6. The LoRA, in diffusers' layout with our facts in its header, saved once by the main process; the ranks'
    # copies are compared first (gradient synchronisation keeps them identical).
    def save(self) -> dict[str, Any]:
        accelerator, run = self.accelerator, self.run
        if self.metrics is not None:
            self.metrics.close()
        if self.scores is not None:
            self.scores.close()
        accelerator.wait_for_everyone()
        whole = self.whole_params()
        copies = accelerator.gather(torch.cat([p.float().flatten() for p in whole]).to(self.device)[None])
        spread = (copies - copies[0]).abs().max().item()
        last_step = self.stopped.get("stopped_at", self.t.max_train_steps)
        _stop_if_not_finite(last_step, self.loss_value, run.checkpoints, whole)
        with averaged_weights(self.ema, self.params):
            final = self.lora_tensors() if accelerator.is_main_process or self.sharded else None
        if accelerator.is_main_process:
            if self.ema is not None:  # the run's LoRA is the average; the raw weights stay beside it (never sharded)
                self.lora_file(run.raw_lora, self.lora_tensors(), last_step)
            self.lora_file(run.lora, final, last_step)
        return {"final_loss": self.loss_value, "processes": self.processes, "sharded": self.sharded,
                "rank_weight_spread": spread, "best_step": self.scores.best if self.scores is not None else None,
                "final_step": last_step, **self.stopped}

    def give_back_base(self) -> None:
        """A warm worker keeps the base for its next run; this run's references to it go."""
        if self.route is not None:
            self.route.remove()
        if self.held is not None:
            self.held.give_back(self.model)
        self.transformer = self.model = self.optimizer = self.scheduler = self.ema = None

    def lora_tensors(self) -> dict[str, torch.Tensor]:
        """The run's LoRA: the denoiser's, and the text encoders' where it trains them (of a sharded transformer,
        every process must call it)."""
        return {**lora_state_dict(self.model),
                **(self.text_encoders.lora_state_dict() if self.text_encoders is not None else {})}

    def lora_file(self, path: Path, tensors: dict[str, torch.Tensor], step: int) -> None:
        """The LoRA in diffusers' layout with our facts in its header (the final one, or a sample step's)."""
        config, t = self.config, self.t
        save_lora(path, tensors, self.model.peft_config["default"], {
            "base_model": config.model.base, "trigger_word": " ".join(p.token for p in config.people),
            "class_word": " ".join(p.class_word for p in config.people), "rank": t.rank, "alpha": t.lora_alpha,
            "adapter": t.adapter, "steps": step, "learning_rate": t.learning_rate, "run": self.run.name,
            "version": __version__, **({"checkpoint": config.model.checkpoint.name} if config.model.checkpoint else {}),
        }, text_encoder_configs=self.text_encoders.configs if self.text_encoders is not None else None)

    def training_state(self, step: int) -> dict[str, Any]:
        """What a resume restores (sharded: gathered from every process, so every process calls it)."""
        return {"step": step, "optimizer": optimizer_state(self.model, self.optimizer.optimizer) if self.sharded
                else self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "generator": self.generator.get_state(), "order": self.order.state_dict(),
                "attention": [backend.name for backend in self.attention],
                **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
                **({"class_order": self.class_order.state_dict()} if self.class_order is not None else {})}

    def whole_params(self) -> list[torch.Tensor]:
        """The LoRA's weights, gathered whole where sharded: every process then sees (and judges) the same."""
        return [full_tensor(p.detach()) for p in self.params] if self.sharded else self.params


def _save_samples(config: StudyConfig, run: RunPaths, step: int, transformer, vae, folder: Path, family, texts,
                  prompts: list[str], text: TextEncoding, write: bool = True) -> list[Path]:
    """Fixed-seed samples of the current LoRA, made in eval mode (gradient checkpointing is inert: the pipeline
    runs without gradients), from the cached embeddings: the text encoders stay unloaded (or, where the run trains
    them, `texts` encodes each prompt through them as they are now). `write`: this process saves them (a sharded
    transformer draws on every process, and one writes). Returns their paths, one per prompt."""
    transformer.eval()
    if isinstance(texts, TrainedTextEncoders):
        texts.eval()
    pipe = family.sample_pipeline(folder, transformer, vae, load_component(folder, "scheduler"))
    pipe.set_progress_bar_config(disable=True)
    dtype = next(vae.parameters()).dtype
    with torch.no_grad():
        negative = texts[family.negative_prompt] if family.negative_prompt is not None else None
        embeddings = [family.pipeline_embeddings(texts[prompt], negative, vae.device, dtype) for prompt in prompts]
    paths = [run.samples / f"step-{step:06d}_p{index}.png" for index in range(len(prompts))]
    for prompt_embeddings, path in zip(embeddings, paths):
        image = render(pipe, seed=config.train.seed, guidance=guidance_scales(config, config.model.base)[0],
                       steps=config.train.sample_steps, size=training_resolution(config), text=text,
                       embeddings=prompt_embeddings)
        if write:
            with atomic_path(path) as tmp:
                image.save(tmp, format="PNG")
    transformer.train()
    if isinstance(texts, TrainedTextEncoders):
        texts.train()
    return paths
