"""The one schema of a study (docs/configuration.md lists every key), loading from TOML/JSON/YAML, and `--set
section.key=value` overrides.

Unknown keys and bad values are errors that name the key: every model forbids extra fields, and
validation errors are turned into one line that names the file and the dotted key.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from lookalike.errors import LookalikeError
from lookalike.workspace import run_name_problem


class Section(BaseModel):
    # allow_inf_nan: no setting means anything at infinity or NaN; such a value is a typo or an overflow.
    # use_attribute_docstrings: each key's docstring is its description (docs/configuration.md is written from them).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False,
                              use_attribute_docstrings=True)


class ModelConfig(Section):
    base: str = "flux-dev"
    """A base of one of the model families by its name (docs/bases.md lists them, and so does `lookalike init
    --help`), or a local diffusers folder, its family told by its model_index.json."""
    revision: str | None = None
    """The hub revision (branch, tag or commit) of a hub base; None: its main branch."""
    checkpoint: Path | None = None
    """A single-file checkpoint of the base (a community fine-tune): a transformer base's transformer, as ComfyUI's
    diffusion_models folder holds one (its original layout or diffusers'), or an SD 1.x / SDXL model in its original
    layout (UNet, VAE, text encoders), whose weights replace the base's; made once into the workspace's bases/
    folder (models/checkpoint.py). Taken relative to the config file."""
    max_sequence_length: int | None = Field(None, ge=1, le=512)
    """Text tokens per prompt; None takes the base model's own default (512 for dev and Z-Image, 256 for schnell)."""
    text_encoder_out_layers: list[int] | None = None
    """FLUX.2 only: which hidden layers of its text encoder are stacked into the prompt's embeddings, as many as its
    pipeline stacks; None: its pipeline's ([klein]: 9, 18, 27; [dev]: 10, 20, 30). train_dreambooth_lora_flux2_klein.py
    trains [klein] at 10, 20, 30; images are drawn at the same layers as training."""


class SubjectConfig(Section):
    token: str = Field(min_length=1)
    """The trigger word the LoRA learns the person by, one word (e.g. sks); prompts write it as {token}."""
    class_word: str = "person"
    """What the person is (man, woman, person): captions and class images use it, and CLIP Score reads it in
    place of the trigger word."""
    images: Path
    """The folder of the person's photos (only read, never changed). Taken relative to the config file."""
    real_name: str | None = None
    """The person's real name, if the base might know them: the ablation compares drawing by it with the trigger
    word."""
    caption: str = "a photo of {token}"
    """Caption of every photo without a .txt caption beside it; {token} and {class_word} are filled in."""
    references: Path | None = None
    """A folder of other photos of this person, never trained on, that likeness is measured against (held out:
    a LoRA that copies its training photos gains nothing there). None: the photos prepare kept for training, as
    the seed study measured."""
    exclude: list[str] = []
    """Names of photos in `images` left out of training whatever prepare's checks find (chosen by hand, as the
    studio's Exclude does)."""
    keep: list[str] = []
    """Names of photos in `images` kept although a check would leave them out (a readable photo prepare can crop)."""

    @field_validator("token")
    @classmethod
    def _one_word(cls, token: str) -> str:
        if any(c.isspace() for c in token):
            raise ValueError("must be one word without spaces")
        return token


CheckAction = Literal["warn", "exclude", "off"]


class DataChecks(Section):
    """What prepare does with a photo that fails each check: keep it with a warning, leave it out, or not check."""

    no_face: CheckAction = "exclude"
    """A photo in which no face is found."""
    several_faces: CheckAction = "warn"
    """A photo with more than one face (the one most like the other photos' faces is used)."""
    face_too_small: CheckAction = "warn"
    """A face whose crop must be enlarged more than [data] max_upscale."""
    duplicate: CheckAction = "exclude"
    """A photo with the same bytes as another, or within [data] near_duplicate_bits of its perceptual hash."""
    identity_outlier: CheckAction = "exclude"
    """A face whose median distance to the other photos' faces is over the face backend's same-person threshold
    (probably someone else)."""
    too_few: Literal["warn", "error"] = "error"
    """Fewer than [data].min_photos photos kept: stop with an error, or go on with a warning."""


MAX_RESOLUTION = 4096  # 16 M pixels: far beyond the 1-2 M pixels FLUX.1 trains and draws at, within what prepare reads


class DataConfig(Section):
    captioner: str | None = None
    """An image-to-text model of transformers (hub id or folder, e.g. Salesforce/blip-image-captioning-large)
    that describes each kept photo; its caption, with the trigger word in place of the person, is written once to
    data/captions/ (edit it there). None: every photo gets [subject] caption."""
    resolution: int = Field(1024, ge=16, le=MAX_RESOLUTION)
    """The side of the square crops prepare writes (a multiple of 16); runs train at it unless the base's own size
    is smaller or [train] resolution says otherwise."""
    crop: Literal["face", "center"] = "face"
    """face: a square around the face prepare finds; center: the centred square (subjects without a face)."""
    face_scale: float = Field(0.4, gt=0, le=1)
    """The face box's side as a share of the square crop's side (0.4: head and shoulders)."""
    buckets: bool = False
    """Aspect-ratio buckets: each photo keeps its own framing, trimmed to the nearest of 1:1, 4:5, 5:4, 3:4, 4:3,
    2:3, 3:2, 9:16 and 16:9 (the strip cut where it keeps the face nearest the centre; face_scale does not apply)
    at about resolution² pixels; each training batch holds photos of one ratio. False: square crops."""
    max_upscale: float = Field(2.0, ge=1)
    """A face whose crop must be enlarged more than this to reach the resolution is too small."""
    near_duplicate_bits: int = Field(8, ge=0, le=64)
    """Photos whose perceptual hashes differ in at most this many of 64 bits are near duplicates."""
    min_photos: int = Field(3, ge=1)
    """Fewer photos kept than this stops prepare with an error ([data.checks] too_few = "warn" goes on)."""
    checks: DataChecks = DataChecks()
    """What prepare does with a photo that fails each check: [data.checks]."""

    @field_validator("resolution")
    @classmethod
    def _multiple_of_16(cls, resolution: int) -> int:
        # Every base here patches 2x2 latents and its VAE downsamples 8x.
        if resolution % 16:
            raise ValueError(f"must be a multiple of 16 (got {resolution})")
        return resolution


class StopRule(Section):
    """When a run stops before max_train_steps, judged at each scored sample step (train.score_samples)."""

    identity_plateau: int | None = Field(None, ge=1)
    """Stop after this many scored sample steps in a row without a new best identity similarity."""
    clip_below: float | None = Field(None, gt=0, lt=1)
    """Stop when CLIP Score falls below this fraction of its best so far (prompt adherence lost to the face)."""


class TrainConfig(Section):
    learning_rate: float = Field(5e-4, gt=0)
    """The LoRA's peak learning rate (AdamW's step size; with prodigy, a multiplier of its own estimate)."""
    rank: int = Field(16, ge=1)
    """The LoRA's rank: the width of each layer's low-rank change."""
    alpha: float | None = Field(None, gt=0)
    """LoRA alpha; None means alpha = rank (scale 1). The study's script had it stuck at rank."""
    max_train_steps: int = Field(1000, ge=1)
    """Optimizer steps the run trains for."""
    lr_scheduler: Literal["constant", "cosine", "linear", "cosine_with_restarts", "polynomial"] = "cosine"
    """How the learning rate moves after the warm-up, as diffusers' get_scheduler (its reference scripts'
    --lr_scheduler) shapes it: constant; cosine (half a cosine, down to 0); linear (down to 0); cosine_with_restarts
    (lr_num_cycles cosines, each from the top); polynomial (down to 1e-7 along (1 - progress) ** lr_power)."""
    lr_warmup_steps: int = Field(0, ge=0)
    """Steps over which the learning rate rises linearly from 0, before any schedule."""
    lr_num_cycles: int = Field(1, ge=1)
    """cosine_with_restarts: how many cosines (hard restarts) the run makes."""
    lr_power: float = Field(1.0, gt=0)
    """polynomial: the power of its decay (1.0: linear)."""
    loraplus_lr_ratio: float | None = Field(None, gt=1)
    """LoRA+ (Hayou et al. 2024; kohya's loraplus_lr_ratio): the LoRA's B (up) matrices learn at learning_rate
    times this, the A (down) matrices at learning_rate; 16 is the paper's advice for such fine-tuning. None: one
    learning rate for both."""
    batch_size: int = Field(1, ge=1)
    """Subject examples per step and process (with prior preservation, as many class examples beside them)."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Batches whose gradients add up to one optimizer step: an effective batch of batch_size times this."""
    checkpoint_every: int = Field(250, ge=0)
    """Steps between checkpoints; 0 turns them off. --resume continues from the latest."""
    checkpoints_keep: int = Field(2, ge=1)
    """How many of the latest checkpoints are kept."""
    sample_every: int = Field(250, ge=0)
    """Steps between fixed-seed sample images; 0 turns them off."""
    sample_prompts: list[str] = ["a photo of {token}"]
    """The prompts of the sample images drawn every sample_every steps ({token}, {class_word} filled in)."""
    sample_steps: int = Field(20, ge=1)
    """Inference steps of each sample image."""
    score_samples: bool = True
    """Score each sample step's images as `lookalike evaluate` would ([evaluate]: face backend, CLIP model) into
    runs/<name>/sample_scores.jsonl, and keep the best step's LoRA by the report's rule as lora-best.safetensors."""
    stop_when: StopRule | None = None
    """Early stopping (off by default), e.g. `stop_when = { identity_plateau = 3, clip_below = 0.9 }`: either
    rule stops the run, which keeps the LoRA of the step it stopped at; status.json says why and when."""
    seed: int = 0
    """Seeds the LoRA's initialisation and every random draw of training (data order, noise, levels): the same seed
    trains the same LoRA."""
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    """auto: bf16 on a GPU that supports it, full precision on the CPU."""
    gradient_checkpointing: bool = False
    """Recompute each transformer block in the backward pass instead of keeping its values: much less memory, a
    slower step."""
    gradient_checkpointing_every: int = Field(1, ge=1)
    """With gradient_checkpointing: recompute every k-th transformer block only (1: every block, the least memory)."""
    captions: bool = True
    """Train each photo on its own caption (a .txt beside it, or the captioner's in data/captions/); false: every
    photo on its person's [subject] caption, so that an experiment or sweep can measure what captions add."""
    caption_dropout: float = Field(0.0, ge=0, lt=1)
    """The chance that a subject example is trained with the empty caption instead of its own (0.05-0.1 is
    common): the face is then learned without the trigger word too, which helps prompts that do not name it."""
    tag_shuffle: int = Field(0, ge=0, le=100)
    """Shuffle the comma-separated tags of each caption, the first (the trigger word's) kept first, as kohya's
    shuffle_caption does: this many orders of each caption are drawn once from the seed and encoded once (text
    embeddings are cached, not made at every step), and each step trains on one of them. 0: off."""
    adapter: Literal["lora", "dora", "lokr"] = "lora"
    """lora; dora (peft's DoRA: each adapted weight's direction by the LoRA, its norm learned apart), which every
    family's diffusers pipeline loads with load_lora_weights; or lokr (peft's LoKr, LyCORIS's Kronecker-product
    adapter, as kohya's LyCORIS, SimpleTuner and ai-toolkit train it): each weight change is kron(w1, w2), w1 a
    small matrix of side lokr_factor, w2 of rank `rank` (a full matrix at a rank of half its side or more: "full"
    LoKr). merge and resize take plain LoRAs only; export takes LoRAs and LoKrs."""
    lokr_factor: int = Field(-1, ge=-1, le=4096)
    """With adapter = 'lokr': the side of the small Kronecker factor w1 where it divides the layer's width
    (LyCORIS's factor; SimpleTuner's FLUX recipe: 16 with a full w2); -1: the divisor nearest the square root."""
    train_text_encoder: bool = False
    """Train a LoRA on the text encoders too (FLUX.1's CLIP, SD 1.x's, SDXL's and SD3's CLIPs: the reference scripts'
    --train_text_encoder, and kohya's default for SD), on their attention's q, k, v and out projections at the
    run's rank and alpha. The captions are then encoded at every step instead of once. Not with shard."""
    text_encoder_lr: float | None = Field(None, gt=0)
    """The text encoders' learning rate (None: learning_rate, as train_dreambooth_lora.py and kohya; diffusers' SDXL
    and FLUX.1 scripts default to 5e-6)."""
    output_preservation: float = Field(0.0, ge=0)
    """Differential output preservation (ai-toolkit's DOP), e.g. 1.0: the LoRA is also taught to leave the base's
    output for the subject's class alone (each caption with its trigger word made the class word, compared with the
    base's prediction), added to the loss times this; no class images needed, and "sks next to a person" keeps two
    people. Each step runs the subject's examples twice more (once without gradients). 0 (the default): off, so a
    sweep can compare [0, 1.0]. Not with train_text_encoder."""
    init_lora: Path | None = None
    """Start from this LoRA file instead of a fresh LoRA (kohya's network_weights, SimpleTuner's init_lora): a
    diffusers-layout file (as lookalike, diffusers' scripts and ai-toolkit write) of this base, on layers
    target_modules adapts, of rank up to train.rank (a higher run rank adds directions that start at zero). Its
    weight change is kept exactly whatever the run's alpha. The run keeps a copy, runs/<name>/init_lora.safetensors,
    so it repeats from its own folder; a changed file makes the finished run stale."""
    target_modules: Literal["attention", "diffusers", "attention+mlp"] = "attention"
    """Which layers the LoRA adapts, as the base's family names them: attention (the fewest parameters and least
    memory: the default), diffusers (the default set of the family's diffusers reference script; FLUX.1's:
    attention and the double blocks' feed-forward), attention+mlp (every feed-forward too)."""
    layer_filter: str | None = None
    """A regular expression: of the layers target_modules adapts, only those whose names it matches anywhere, as
    kohya's train_double_block_indices / train_single_block_indices and ai-toolkit's only_if_contains single out
    blocks; e.g. 'single_transformer_blocks\\.(7|20)\\.' adapts two of FLUX.1's single blocks. None: all of them."""
    timestep_sampling: Literal["uniform", "logit_normal", "mode"] | None = None
    """How each example's noise level is drawn, as diffusers' reference scripts draw it (their --weighting_scheme):
    u uniform, logit_normal (u = sigmoid(N(logit_mean, logit_std)), the SD3 paper's choice; other trainers'
    'sigmoid' sampling) or mode (the SD3 paper's mode sampling with mode_scale); u then picks one of the 1,000
    noise levels of the base's scheduler, the noisiest first (so a logit_mean above 0 trains on less noise, as in
    the scripts). None: the base's reference script's (uniform; SD3's logit_normal)."""
    logit_mean: float = 0.0
    """timestep_sampling = "logit_normal": the mean of the normal draw u's logit is taken from."""
    logit_std: float = Field(1.0, gt=0)
    """timestep_sampling = "logit_normal": its standard deviation."""
    mode_scale: float = Field(1.29, ge=-1, le=1.75)
    """timestep_sampling = "mode": how much heavier the middle noise levels are (0: uniform; diffusers' 1.29; the
    SD3 paper's range, where it stays a density on (0, 1): -1 to 2 / (pi - 2))."""
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"
    """Flow-matching bases: each example's loss weighted by its noise level, as the SD3 paper's and diffusers'
    reference scripts' --weighting_scheme: sigma_sqrt (sigma^-2), cosmap (2 / (pi (1 - 2 sigma + 2 sigma^2))); none:
    plain (every reference script's default). Stable Diffusion bases weight by snr_gamma instead."""
    timestep_shift: float | None = Field(None, gt=0)
    """The noise levels' shift, sigma -> shift*sigma / (1 + (shift-1)*sigma); > 1 trains more on noisy timesteps.
    None: the base scheduler's, as its reference script trains (3 for SD3 and Z-Image, whose schedulers shift by 3;
    1 where the scheduler shifts by image size only when drawing: FLUX, Qwen-Image, Krea 2)."""
    vae_posterior: Literal["sample", "mode"] | None = None
    """Each photo's latents as a new draw of the VAE's posterior at every step (sample) or its mean (mode). None:
    the base's reference script's (mode for FLUX.2 and Z-Image, sample elsewhere)."""
    guidance: float = Field(1.0, ge=0)
    """Guidance fed to guidance-distilled models (FLUX.1-dev, FLUX.2 [dev]) while training: 1.0, as FLUX trainers
    advise (diffusers' scripts default to 3.5)."""
    resolution: int | None = Field(None, ge=16, le=MAX_RESOLUTION)
    """The side this run trains (and by default draws) at, its prepared crops scaled to it; None: [data]
    resolution, or the base's own size where that is smaller (SD 1.x 512, SDXL 1024), so that one study at 1024 px
    trains each base at its size. An experiment may set it like any [train] key."""
    background_loss_weight: float = Field(1.0, ge=0, le=1)
    """Masked training around the face: the loss weight of each photo's latent cells outside its face (the face
    prepare found, grown by a quarter on every side for hair and ears), against 1 inside. Below 1 (e.g. 0.1) the
    LoRA learns the face more than the photos' backgrounds and clothes, which otherwise come back in every image;
    0 learns the face alone. 1.0: the plain loss, as diffusers' scripts. Photos without a face and class images
    always train with the plain loss."""
    flip: bool = False
    """Also train on each photo mirrored left to right (kohya's flip_aug, ai-toolkit's flip_x): twice the examples,
    each encoded from its mirrored pixels. Faces are nearly symmetric, but a parting, a mole or a logo is mirrored
    too. Class images are not mirrored."""
    extra_resolutions: list[Annotated[int, Field(ge=16, le=MAX_RESOLUTION, multiple_of=16)]] = []
    """More sides every photo also trains at, beside the run's resolution (ai-toolkit's multi-resolution training,
    e.g. [512, 768] in a 1024 px run), so that the LoRA draws as well at those sizes: each photo is an example at
    each size, and a batch never mixes sizes. Samples stay at the run's resolution. Each a multiple of 16 and at
    most [data] resolution (the size the crops are made at)."""
    noise_offset: float = Field(0.0, ge=0, le=1)
    """Stable Diffusion bases (noise prediction): add this times noise constant over each channel (0.05-0.1 is
    common); flow-matching bases do not use it."""
    snr_gamma: float | None = Field(None, gt=0)
    """Stable Diffusion bases: min-SNR loss weighting with this gamma (5.0 is the paper's); None: plain MSE.
    Flow-matching bases do not use it (their timestep_sampling plays that part)."""
    base_quantization: Literal["none", "nf4", "int8", "fp8"] = "none"
    """The frozen transformer's linear weights stored quantised, the LoRA trained on top in full precision:
    nf4 (bitsandbytes, CUDA only) about a quarter of bf16's memory, int8 or fp8 (torchao, weight-only) half.
    Quantised weights are approximate, and dequantising them for every matmul costs some speed."""
    fp8_compute: bool = False
    """The frozen base's linear layers multiply in float8 (torchao's float8 training, as diffusers' scripts'
    --do_fp8_training), the LoRA in its own precision: faster steps on GPUs with float8 tensor cores (compute
    capability 8.9+: Ada, Hopper, Blackwell), no memory saved, the loss slightly off bf16's. Needs
    mixed_precision = 'bf16'."""
    tread_ratio: float | None = Field(None, gt=0, lt=1)
    """TREAD token routing (FLUX.1, SD3 and 3.5, Qwen-Image): while training, this share of the image tokens skips
    the blocks tread_blocks names, and joins the others again after them; cheaper steps, at some cost in what the
    LoRA learns (the scores of a run with sample scoring show it). Images are drawn with every token. None: off.
    TREAD's authors and SimpleTuner route 0.5."""
    tread_blocks: tuple[int, int] = (2, -2)
    """The first and last block of the route (counted over the denoiser's blocks in the order they run, double then
    single for FLUX.1; negative ones from the end): by default from the third to the second-to-last, as SimpleTuner
    routes."""
    compile: bool | Literal["auto"] = "auto"
    """torch.compile each of the transformer's repeated blocks (regional compilation: the blocks of a kind share
    one compiled graph). Faster steps after a compile of a minute or so at the first step, whose time the progress
    line shows. auto: on a CUDA GPU for runs of 1,000 steps or more, where the settings allow it (not with a
    quantised base, offload, shard or a LoKr); never on the CPU."""
    offload: bool = False
    """Keep the frozen weights of the denoiser's blocks in CPU memory and bring each block's to the GPU while it
    runs: a base bigger than the GPU (FLUX.1's 12B on 12-16 GB) trains, slower, with as much CPU memory as the
    base takes. Every block is then recomputed in the backward pass, as gradient_checkpointing does (which this
    implies). Not with a quantised, compiled or sharded base, nor with several processes."""
    shard: bool = False
    """With several processes (`train --processes N`, torchrun or `accelerate launch`): shard the frozen
    transformer, the LoRA and AdamW's state across them (FSDP2), so that each GPU holds 1/N of the base: for
    bases too big for one GPU (Qwen-Image's 20B in bf16). Off: each process holds the whole model."""
    optimizer: Literal["adamw", "adamw8bit", "prodigy"] = "adamw"
    """adamw; adamw8bit (bitsandbytes, CUDA): its moments in 8 bits; prodigy (the prodigyopt package): estimates its
    own step size, and learning_rate is a multiplier of that estimate, 1.0 as its authors advise."""
    ema_decay: float | None = Field(None, gt=0, lt=1)
    """Keep an exponential moving average of the LoRA weights (e.g. 0.999; diffusers' EMAModel, whose decay
    warms up as min((1 + step) / (10 + step), ema_decay)). The samples, the best step and lora.safetensors are
    then the average's; the raw weights are kept as lora-raw.safetensors. None: off."""
    weight_decay: float = Field(1e-4, ge=0)
    """AdamW's decoupled weight decay on the LoRA weights (the reference scripts' 1e-4)."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradients are clipped to this norm before each step."""
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on each LoRA layer's input while training (peft's lora_dropout)."""

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else float(self.rank)

    @field_validator("layer_filter")
    @classmethod
    def _layer_filter_is_a_pattern(cls, pattern: str | None) -> str | None:
        try:
            re.compile(pattern or "")
        except re.error as error:
            raise ValueError(f"not a regular expression: {error}") from None
        return pattern

    @field_validator("resolution")
    @classmethod
    def _resolution_multiple_of_16(cls, resolution: int | None) -> int | None:
        if resolution is not None and resolution % 16:
            raise ValueError(f"must be a multiple of 16 (got {resolution})")
        return resolution

    @model_validator(mode="after")
    def _tread_on_plain_blocks(self) -> "TrainConfig":
        # The route hooks the blocks' calls: compiled blocks trace them (the draw breaks a full graph), and offload
        # and shard wrap the same calls with hooks of their own.
        if self.tread_ratio is None:
            return self
        other = ("compile = true" if self.compile is True else "offload = true" if self.offload else
                 "shard = true" if self.shard else None)
        if other:
            raise ValueError(f"tread_ratio cannot be combined with {other}: route tokens on plain blocks, or leave "
                             "tread_ratio unset")
        return self

    @model_validator(mode="after")
    def _fp8_compute_on_plain_weights(self) -> "TrainConfig":
        # Float8 compute casts plain bf16 weights at each matmul: quantised, offloaded or sharded weights are not
        # plain tensors on the device, and fp16 autocast would cast the float8 layers' output again.
        if not self.fp8_compute:
            return self
        other = ("base_quantization = " + repr(self.base_quantization) if self.base_quantization != "none" else
                 "offload = true" if self.offload else "shard = true" if self.shard else
                 "mixed_precision = " + repr(self.mixed_precision) if self.mixed_precision in ("no", "fp16")
                 else None)
        if other:
            raise ValueError(f"fp8_compute = true cannot be combined with {other}: it computes in float8 from the "
                             "base's bf16 weights (mixed_precision = 'bf16' or 'auto', on one GPU)")
        return self

    @model_validator(mode="after")
    def _compile_without_torchao(self) -> "TrainConfig":
        # Measured: torch.compile's autograd refuses torchao's weight tensors (a graph with aliased outputs).
        if self.compile is True and self.base_quantization in ("int8", "fp8"):
            raise ValueError(f"compile = true cannot train on base_quantization = {self.base_quantization!r} "
                             "(torch.compile does not train through torchao's quantised weights yet); choose one")
        return self

    @model_validator(mode="after")
    def _prodigy_learning_rate(self) -> "TrainConfig":
        # Prodigy's learning rate multiplies the step size it finds: an Adam-sized one (1e-4) would stall it.
        if self.optimizer == "prodigy" and self.learning_rate < 0.1:
            raise ValueError(f"optimizer = 'prodigy' finds its own step size, and learning_rate multiplies it: use "
                             f"1.0 as Prodigy's authors advise (got {self.learning_rate:g})")
        return self

    @model_validator(mode="after")
    def _loraplus_with_one_rate_per_group(self) -> "TrainConfig":
        if self.loraplus_lr_ratio is not None and self.optimizer == "prodigy":
            raise ValueError("loraplus_lr_ratio cannot be combined with optimizer = 'prodigy' (Prodigy finds one step "
                             "size for every weight): use adamw, or leave loraplus_lr_ratio unset")
        return self

    @model_validator(mode="after")
    def _text_encoder_settings(self) -> "TrainConfig":
        if self.text_encoder_lr is not None and not self.train_text_encoder:
            raise ValueError("text_encoder_lr is set, and train_text_encoder is false: set train_text_encoder = true "
                             "to train the text encoders, or leave text_encoder_lr unset")
        if self.text_encoder_lr is not None and self.optimizer == "prodigy":
            raise ValueError("text_encoder_lr cannot be combined with optimizer = 'prodigy' (Prodigy finds one step "
                             "size for every weight): use adamw, or leave text_encoder_lr unset")
        if self.train_text_encoder and self.output_preservation:
            raise ValueError("output_preservation compares the LoRA with the base on the class's captions, which "
                             "train_text_encoder = true encodes with its own LoRA: choose one")
        if self.train_text_encoder and self.shard:
            raise ValueError("train_text_encoder = true holds the text encoders whole in every process, and shard = "
                             "true splits the model across them: choose one")
        return self

    @model_validator(mode="after")
    def _init_lora_is_a_lora(self) -> "TrainConfig":
        if self.init_lora is not None and self.adapter == "dora":
            raise ValueError("init_lora starts from a plain LoRA, and adapter = 'dora' learns each weight's norm "
                             "apart from it: use adapter = 'lora', or leave init_lora unset")
        return self

    @model_validator(mode="after")
    def _lokr_settings(self) -> "TrainConfig":
        if self.adapter != "lokr":  # lokr_factor is then unused: a sweep over adapters shares one [train]
            return self
        if self.lokr_factor == 0:
            raise ValueError("lokr_factor must be a positive side, or -1 (the divisor nearest the square root)")
        # Settings made for a LoRA's two matrices, which a LoKr does not have, or that it cannot train with.
        refused = {"init_lora": (self.init_lora is not None, "it starts from a LoRA's two matrices"),
                   "loraplus_lr_ratio": (self.loraplus_lr_ratio is not None, "it speeds up a LoRA's B matrix"),
                   "lora_dropout": (self.lora_dropout > 0, "it drops out a LoRA's input"),
                   "train_text_encoder": (self.train_text_encoder, "it trains a LoRA of the text encoders"),
                   "base_quantization": (self.base_quantization == "nf4",
                                         "'nf4' packs the weights into a shape peft's LoKr layers cannot read"),
                   "compile": (self.compile is True, "peft's LoKr layers branch on a random draw while training, which "
                               "torch.compile cannot trace")}
        for setting, (used, why) in refused.items():
            if used:
                raise ValueError(f"adapter = 'lokr' cannot be combined with {setting} ({why}): use adapter = "
                                 f"'lora', or leave {setting} unset")
        return self

    @model_validator(mode="after")
    def _stop_needs_scores(self) -> "TrainConfig":
        if self.stop_when is not None and not (self.sample_every and self.score_samples):
            raise ValueError("stop_when judges the scored sample steps: it needs sample_every > 0 and "
                             "score_samples = true")
        return self

    @model_validator(mode="after")
    def _offload_alone(self) -> "TrainConfig":
        if not self.offload:
            return self
        other = ("base_quantization = " + repr(self.base_quantization) if self.base_quantization != "none" else
                 "compile = true" if self.compile is True else "shard = true" if self.shard else None)
        if other:
            raise ValueError(f"offload = true cannot be combined with {other}: offload plain weights on one GPU")
        return self

    @model_validator(mode="after")
    def _shard_alone(self) -> "TrainConfig":
        # Sharding splits plain weights across processes; quantised weights and compiled blocks are not split so.
        if self.shard and (self.base_quantization != "none" or self.compile is True):
            what = f"base_quantization = {self.base_quantization!r}" if self.base_quantization != "none" \
                else "compile = true"
            raise ValueError(f"shard = true cannot be combined with {what}: shard the base, or quantise (or "
                             "compile) it on one GPU")
        return self


class GenerateConfig(Section):
    base: str | None = None
    """The base images are drawn with; None: the one trained on ([model] base, or an experiment's). Another base of
    the same family, as LoRAs trained on a non-distilled base are drawn with its distilled one (Krea 2's reference
    recipe: trained on krea2-raw, drawn with krea2-turbo; z-image and z-image-turbo alike). Its own steps and
    guidance apply. A local diffusers folder is taken relative to the config file."""
    prompts: list[str] = Field(["a photo of {token}"], min_length=1)
    """The prompts images are drawn and scored with ({token}, {class_word}, {token_1}, ... filled in)."""
    seeds: list[int] = Field([0], min_length=1)
    """One image per seed for each prompt, guidance scale and strength."""
    guidance_scales: list[float] | None = Field(None, min_length=1)
    """None: each drawing base's own (its model card's, else its pipeline's default: 3.5 for FLUX.1-dev, 4.0 for
    FLUX.2 [dev] and Qwen-Image, 4.5 for Krea 2 and SD3.5 Medium, 3.5 for SD3.5 Large, 5.0 for Z-Image and SDXL,
    7.5 for SD 1.x), so that a sweep across bases draws each as its authors advise. Not used by a base without
    guidance (FLUX.1-schnell, the distilled FLUX.2 [klein] and turbo models): its images are made once per prompt
    and seed."""
    num_inference_steps: int | None = Field(None, ge=1)
    """None: the base's own (28 for FLUX.1-dev and local folders like it, 4 for schnell)."""
    resolution: int | None = Field(None, ge=16, le=MAX_RESOLUTION)
    """Image side in pixels; None: the run's training resolution ([train] resolution, else [data] resolution or
    the base's own size where smaller)."""
    vae_tiling: bool = False
    """Decode images tile by tile: far less memory for large images, faint seams possible."""
    fuse_lora: bool = False
    """Merge the LoRAs into the transformer's weights: no cost per step, but in bf16 about 1% of a LoRA's
    weight changes round away. Off: the LoRA applies as `load_lora_weights` applies it, so the images scored
    are the ones users of the file get."""
    compile: bool = False
    """torch.compile each of the transformer's repeated blocks, once the LoRAs are loaded: faster images once
    the first one has paid for the compile."""
    offload: bool = False
    """Keep the pipeline's weights in CPU memory and bring each block to the GPU as it runs (diffusers' group
    offloading; on CUDA the next block's copy overlaps this one's work): a base bigger than the GPU draws, slower,
    the same images. Not with compile."""
    negative_prompt: str | None = None
    """What classifier-free guidance steers away from (SDXL, SD 1.x, Z-Image, Qwen-Image), e.g. "blurry, lowres";
    None: the pipeline's own (an empty prompt; zero embeddings for SDXL)."""
    lora_scales: list[Annotated[float, Field(gt=0, le=4)]] = Field([1.0], min_length=1)
    """Strengths the LoRA is applied at, an inference factor beside guidance (e.g. [0.6, 0.8, 1.0, 1.2]): each
    image is made and scored at each, and the report names the best. [1.0]: the LoRA as trained."""
    best_checkpoint: bool = True
    """`lookalike run` also draws and scores each run's best sample step's LoRA (train.score_samples), when it
    is not the final one, into images-best/: the report then names the best (run, checkpoint, strength)."""

    @model_validator(mode="after")
    def _offload_uncompiled(self) -> "GenerateConfig":
        if self.offload and self.compile:
            raise ValueError("offload = true cannot be combined with compile = true: choose one")
        return self

    @model_validator(mode="after")
    def _one_fused_strength(self) -> "GenerateConfig":
        if self.fuse_lora and len(self.lora_scales) > 1:
            raise ValueError("fuse_lora = true merges the LoRA at one strength: with several lora_scales leave it "
                             "off")
        return self


class EvaluateConfig(Section):
    face_backend: Literal["facenet", "dlib"] = "facenet"
    """The face detector and embedding likeness is measured with: facenet (MTCNN + InceptionResnetV1 VGGFace2, the
    study's) or dlib (offline)."""
    clip_model: str = "openai/clip-vit-large-patch14"
    """The CLIP model of CLIP Score (hub id or folder; "tiny": the random offline model tests use)."""
    min_face_score: float | None = None
    """Detections below this confidence are no face; None: the backend's own (MTCNN 0.95, dlib 0.0)."""
    min_face_size: float = Field(0.05, gt=0, lt=1)
    """Faces narrower than this fraction of the image's shorter side are not counted (a speck in the background
    says nothing about likeness, and MTCNN then searches fewer scales)."""
    all_pairs: bool = False
    """CLIP Score over all prompts x all images, as the study averaged it; default: each image with its prompt."""


class PriorConfig(Section):
    """Prior preservation (DreamBooth's second loss term): each step also trains on images of the subject's class
    captioned with the class prompt, so the LoRA keeps what the base draws for the class."""

    num_class_images: int = Field(0, ge=0)
    """How many class images; 0: off."""
    class_prompt: str = "a photo of a {class_word}"
    """Their caption, and the prompt they are drawn with ({class_word}: [subject]'s)."""
    weight: float = Field(1.0, gt=0)
    """The class examples' loss is added times this weight."""
    images: Path | None = None
    """A folder of class images to take instead of drawing them with the base model."""


class AblateConfig(Section):
    unknown_name: str = "Tobin Wrexley"
    """A name no model has seen: the ablation's person the base model cannot know (made up; change it if it
    turns out to be someone's)."""
    run: str | None = None
    """The fine-tuned run to compare with the base model; None: the best run by the report's rule."""


# Keys an experiment may set beside [train]'s: [model] base (one study across several bases), and prior (false:
# this run trains without [prior]'s class images, so a sweep can compare prior preservation on and off).
EXPERIMENT_MODEL_KEYS = ("base", "prior")


def _experiment_model() -> type[BaseModel]:
    """An experiment is a name plus any [train] keys, [model] base and prior, each optional (it overrides the
    study's)."""
    fields: dict[str, Any] = {name: (info.annotation | None, None) for name, info in TrainConfig.model_fields.items()}
    return create_model("Experiment", __base__=Section, name=(str, Field(min_length=1)), base=(str | None, None),
                        prior=(bool | None, None), **fields)


Experiment = _experiment_model()


class SweepConfig(Section):
    experiments: list[Experiment] = []  # type: ignore[valid-type]
    """Experiments named one by one, each overriding [train]."""
    design: Literal["grid", "one-at-a-time", "pairwise"] | None = None
    """None: factors make a grid."""
    factors: dict[str, list[Any]] = {}
    """[train] key -> its levels; the design turns them into experiments, added to the listed ones."""

    @field_validator("factors")
    @classmethod
    def _train_keys(cls, factors: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, levels in factors.items():
            if key not in TrainConfig.model_fields and key not in EXPERIMENT_MODEL_KEYS:
                raise ValueError(f"{key!r} is not a [train] key, base or prior")
            if not levels or len(set(map(repr, levels))) != len(levels):
                raise ValueError(f"{key} needs one or more distinct levels (got {levels!r})")
        return factors

    @model_validator(mode="after")
    def _design_needs_factors(self) -> "SweepConfig":
        if self.design is not None and not self.factors:
            raise ValueError(f"sweep.design = {self.design!r} needs [sweep.factors] to design over")
        return self

    @field_validator("experiments")
    @classmethod
    def _unique_names(cls, experiments: list[Any]) -> list[Any]:
        names = [e.name for e in experiments]
        for name in names:
            if run_name_problem(name):
                raise ValueError(f"experiment name {run_name_problem(name)}")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"experiment names must be unique (repeated: {', '.join(duplicates)})")
        return experiments


class StudyConfig(Section):
    name: str = Field(min_length=1)
    """The study's name, shown in its report and results."""
    workspace: Path
    """The folder where the study writes everything (data/, runs/, report/, ...). Taken relative to the config file."""
    model: ModelConfig = ModelConfig()
    """[model]: the base trained on."""
    subject: SubjectConfig
    """[subject]: the person and their photos."""
    more_subjects: list[SubjectConfig] = []
    """More people, each with their own token, class word and photos: trained into the same LoRA as [subject]
    (captions name each person's token), for group photos; `train --subject TOKEN` trains one person alone."""
    data: DataConfig = DataConfig()
    """[data]: how prepare crops, captions and checks the photos."""
    train: TrainConfig = TrainConfig()
    """[train]: the run's training settings."""
    generate: GenerateConfig = GenerateConfig()
    """[generate]: the images drawn and scored."""
    evaluate: EvaluateConfig = EvaluateConfig()
    """[evaluate]: how likeness and prompt adherence are measured."""
    prior: PriorConfig = PriorConfig()
    """[prior]: prior preservation."""
    ablate: AblateConfig = AblateConfig()
    """[ablate]: what `lookalike ablate` compares."""
    sweep: SweepConfig = SweepConfig()
    """[sweep]: the experiments, listed or made by a design over factors."""

    @model_validator(mode="after")
    def _warmup_fits(self) -> "StudyConfig":
        if self.train.lr_warmup_steps >= self.train.max_train_steps:
            raise ValueError("train.lr_warmup_steps must be smaller than train.max_train_steps")
        return self

    @model_validator(mode="after")
    def _extra_resolutions_within_the_crops(self) -> "StudyConfig":
        larger = [side for side in self.train.extra_resolutions if side > self.data.resolution]
        if larger:
            raise ValueError(f"train.extra_resolutions {larger} above [data] resolution {self.data.resolution}: the "
                             "photos' crops are made at that size, so raise it or leave those sides out")
        return self

    @model_validator(mode="after")
    def _distinct_tokens(self) -> "StudyConfig":
        tokens = [person.token for person in self.people]
        if len(set(tokens)) != len(tokens):
            raise ValueError(f"every subject needs its own token (got {', '.join(tokens)})")
        return self

    @property
    def people(self) -> list[SubjectConfig]:
        """[subject] first, then [[more_subjects]]."""
        return [self.subject, *self.more_subjects]

    @property
    def photo_folders(self) -> list[Path]:
        """The user's photo folders the study reads: each person's photos and held-out references, and the class
        images of [prior] images."""
        folders = [folder for person in self.people for folder in (person.images, person.references)]
        return [folder for folder in [*folders, self.prior.images] if folder is not None]

    def fill(self, text: str, subject: SubjectConfig | None = None) -> str:
        """A prompt or caption template filled in: {token} and {class_word} with `subject`'s (default [subject]),
        {token_1}, {class_word_1}, {token_2}, ... with each person's in order, for group prompts."""
        subject = subject or self.subject
        # str.replace, not str.format: a caption may hold other braces.
        for number, person in enumerate(self.people, 1):
            text = text.replace(f"{{token_{number}}}", person.token)
            text = text.replace(f"{{class_word_{number}}}", person.class_word)
        return text.replace("{token}", subject.token).replace("{class_word}", subject.class_word)

    def for_subject(self, token: str) -> "StudyConfig":
        """This study with one of its people alone as [subject] (one LoRA per person)."""
        for person in self.people:
            if person.token == token:
                return self.model_copy(update={"subject": person, "more_subjects": []})
        raise LookalikeError(f"--subject: no subject with token {token!r} (tokens: "
                             f"{', '.join(p.token for p in self.people)})")

    def with_train(self, overrides: dict[str, Any], source: str) -> "StudyConfig":
        """This config with [train] keys overridden; a bad value is an error naming `source` and the key."""
        try:
            train = TrainConfig.model_validate({**self.train.model_dump(), **overrides})
            return StudyConfig.model_validate({**self.model_dump(), "train": train.model_dump()})
        except ValidationError as error:
            raise LookalikeError(_format_errors(source, error)) from None

    def with_experiment(self, overrides: dict[str, Any], source: str) -> "StudyConfig":
        """This config with an experiment's settings: [train] keys, the base when it names one, and prior
        preservation off when it says prior = false."""
        train = {key: value for key, value in overrides.items() if key not in EXPERIMENT_MODEL_KEYS}
        config = self.with_train(train, source)
        if overrides.get("base") is not None and overrides["base"] != self.model.base:
            # model.checkpoint holds model.base's weights: another base trains on its own.
            model = config.model.model_copy(update={"base": overrides["base"], "checkpoint": None})
            config = config.model_copy(update={"model": model})
        if overrides.get("prior") and not self.prior.num_class_images:
            raise LookalikeError(f"{source}: prior = true needs [prior] num_class_images (the class images to train "
                                 "on)")
        if overrides.get("prior") is False:
            config = config.model_copy(update={"prior": config.prior.model_copy(update={"num_class_images": 0})})
        return config

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise LookalikeError(f"config file not found: {path}")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise LookalikeError(f"{path}: not a config file (not text; give the study's .toml, .json or .yaml)") from None
    data = _parse(path, text)
    if not isinstance(data, dict):
        raise LookalikeError(f"{path}: a config holds keys and sections at its top level, not a "
                             f"{type(data).__name__}")
    return data


def _parse(path: Path, text: str) -> Any:
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        if path.suffix == ".json":
            return json.loads(text)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
            return data if data is not None else {}
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise LookalikeError(f"{path}: not valid {path.suffix[1:].upper()}: {error}") from None
    except Exception as error:  # yaml's errors all derive from yaml.YAMLError; keep yaml an optional import
        raise LookalikeError(f"{path}: not valid YAML: {error}") from None
    raise LookalikeError(f"{path}: unknown config format {path.suffix!r} (use .toml, .json or .yaml)")


def _parse_value(text: str) -> Any:
    """A --set value as TOML reads it (numbers, booleans, lists, quoted strings); anything else is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides to raw config data (validation happens afterwards); `section.key=`
    with nothing after the = unsets the key, which then takes its default (an optional file: none)."""
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key.strip():
            raise LookalikeError(f"--set {override!r}: expected section.key=value")
        *sections, leaf = key.strip().split(".")
        node = data
        for section in sections:
            node = node.setdefault(section, {})
            if not isinstance(node, dict):
                raise LookalikeError(f"--set {override!r}: {section} is not a section")
        if value.strip():
            node[leaf] = _parse_value(value.strip())
        else:
            node.pop(leaf, None)
    return data


def _format_errors(source: str, error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            problems.append(f"unknown key {key}")
        elif item["type"] == "missing":
            problems.append(f"missing key {key}")
        else:
            message = item["msg"].removeprefix("Value error, ")
            given = item.get("input")  # a whole section's keys, for a check across them, are named by the message
            problems.append(f"{key}: {message}" + ("" if isinstance(given, dict) else f" (got {given!r})"))
    return f"{source}: " + "; ".join(problems)


def validate(data: dict[str, Any], source: str, base_dir: Path) -> StudyConfig:
    """Validate raw config data; relative paths are taken relative to `base_dir` (the config file's folder)."""
    try:
        config = StudyConfig.model_validate(data)
    except ValidationError as error:
        raise LookalikeError(_format_errors(source, error)) from None

    keys = ["subject", *(f"more_subjects[{i}]" for i in range(len(config.more_subjects)))]
    subject, *more = (person.model_copy(update={
        "images": _resolved(base_dir / person.images, f"{source}: {key}.images"),
        "references": None if person.references is None else _resolved(base_dir / person.references,
                                                                       f"{source}: {key}.references")})
        for key, person in zip(keys, config.people))
    workspace = _resolved(base_dir / config.workspace, f"{source}: workspace")
    data = workspace / "data"
    for key, person in zip(keys, [subject, *more]):
        if person.images.is_relative_to(data) or data.is_relative_to(person.images):
            raise LookalikeError(f"{source}: {key}.images: {person.images} overlaps the workspace's prepared-data "
                                 f"folder {data}, where prepare writes and removes files; keep the photos in a folder "
                                 "of their own")
    model = config.model.model_copy(update={"base": _base(config.model.base, base_dir),
                                            "checkpoint": _path(config.model.checkpoint, base_dir)})
    generate = config.generate.model_copy(update={"base": _base(config.generate.base, base_dir)})
    train = config.train.model_copy(update={"init_lora": _path(config.train.init_lora, base_dir)})
    relative = {"base": _base, "init_lora": _path}  # the keys an experiment or a factor may give as a path
    sweep = config.sweep.model_copy(update={
        "experiments": [e.model_copy(update={key: resolve(getattr(e, key), base_dir) for key, resolve in
                                             relative.items()}) for e in config.sweep.experiments],
        "factors": {key: [relative[key](level, base_dir) for level in levels] if key in relative else levels
                    for key, levels in config.sweep.factors.items()}})
    return config.model_copy(update={"workspace": workspace, "subject": subject, "more_subjects": more,
                                     "model": model, "generate": generate, "train": train, "sweep": sweep})


def _base(base: str | None, base_dir: Path) -> str | None:
    """A base's name as it is; a local diffusers folder relative to the config file, like every path: a base that
    is written as a path (a separator, or a leading . or ~) or names a folder beside the config file. (Whether a
    name is a known base is for the models layer to say: models.base.is_base.)"""
    if base is None:
        return None
    if any(separator in base for separator in ("/", "\\")) or base.startswith((".", "~")) or \
            (base_dir / base).is_dir():
        return str((base_dir / Path(base).expanduser()).resolve())
    return base


def _path(path: Path | str | None, base_dir: Path) -> Path | None:
    """A file's path relative to the config file, like every path (None stays None)."""
    return None if path is None else (base_dir / path).resolve()


def _resolved(path: Path, what: str) -> Path:
    try:
        return path.resolve()
    except (RuntimeError, OSError) as error:  # a symlink loop
        raise LookalikeError(f"{what}: cannot follow {path} ({error})") from None


def evaluate_settings(options: dict[str, Any]) -> EvaluateConfig:
    """[evaluate] settings given without a config file (evaluate --images ... --face-backend ...)."""
    try:
        return EvaluateConfig.model_validate(options)
    except ValidationError as error:
        raise LookalikeError(_format_errors("evaluate options", error)) from None


def load_config(path: Path | str, overrides: list[str] = ()) -> StudyConfig:
    """Load a study config, apply --set overrides, validate, and resolve relative paths."""
    path = Path(path)
    data = apply_overrides(_read_file(path), list(overrides))
    return validate(data, str(path), path.parent.resolve())
