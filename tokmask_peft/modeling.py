"""One builder for every classifier: full | lora | qlora (4-bit NF4 / 8-bit), sequence | token
classification, encoders and decoders, with pad and mask ids settled before training starts.
"""
from __future__ import annotations

import copy
import hashlib
import os
import shutil
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

from .config import ModelConfig, resolve_path
from .masking import MaskToken, resolve_mask_token
from .problems import HF_PROBLEM_TYPES

HEAD_NAMES = ("score", "classifier")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_root() -> Path:
    return Path(os.environ.get("TOKMASK_CACHE", Path.home() / ".cache" / "tokmask_peft"))


def local_or_hub(value: str, field: str) -> str:
    """``value`` resolved (``pkg:`` paths); a path that is plainly local (absolute, ``./``, ``~``,
    ``pkg:``) must exist, else transformers reports it as a malformed hub id."""
    resolved = resolve_path(value)
    local = value.startswith(("/", "./", "../", "~", "pkg:")) or Path(value).is_absolute()
    if local and not Path(resolved).expanduser().exists():
        raise FileNotFoundError(f"{field} {value!r}: no such directory")
    if not local and not Path(resolved).exists() and not _hub_reachable(resolved):
        raise FileNotFoundError(f"{field} {value!r}: no such local directory (relative to {Path.cwd()}), and the "
                                "hub is unreachable (HF_HUB_OFFLINE is set) with no cached copy of that id")
    return str(Path(resolved).expanduser()) if local else resolved


def _hub_reachable(repo_id: str) -> bool:
    """False only when hub access is off and the id is not in the local hub cache."""
    from huggingface_hub import constants

    # With the hub on, transformers will try, and name the id if it fails.
    return not constants.HF_HUB_OFFLINE or _cached_snapshot(repo_id) is not None


def _cached_snapshot(repo_id: str) -> Path | None:
    """The local hub cache's copy of ``repo_id``, or None (nothing is downloaded)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, or not a valid hub id
        return None


def weights_path(cfg: ModelConfig) -> str:
    """Where to load weights from: ``cfg.name``, or for GGUF a safetensors copy made once.

    Dequantising a GGUF file takes 20-60 s; the copy makes later loads (every sweep run, every
    test) take about a second.
    """
    if not cfg.gguf_file:
        return local_or_hub(cfg.name, "model.name")
    source = Path(resolve_path(cfg.name)) / cfg.gguf_file
    if not source.is_file():
        raise FileNotFoundError(f"GGUF file {source} does not exist (model.name + model.gguf_file)")
    stat = source.stat()
    key = hashlib.sha1(f"{source.resolve()}|{stat.st_size}".encode()).hexdigest()[:12]
    target = cache_root() / "gguf" / f"{source.stem}-{key}"
    if not (target / "config.json").exists():
        from transformers import AutoModelForCausalLM

        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=cfg.gguf_file, dtype=torch.float32)
        # The tensors are dequantised already; drop the GGUF marker so they save as plain safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(source.parent, gguf_file=cfg.gguf_file).save_pretrained(tmp)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
    return str(target)


IDENTITY_CHUNKS, IDENTITY_CHUNK_BYTES = 16, 1 << 16


def base_identity(cfg: ModelConfig) -> str | None:
    """A cheap identity of the base's weights: file names, sizes and 16 chunks of 64 KiB spread over
    each weight file (about 1 MiB read, whatever the model's size). Another checkpoint of the same
    architecture differs in it; None where the files cannot be found locally (nothing to check)."""
    if cfg.gguf_file:
        files = [Path(resolve_path(cfg.name)) / cfg.gguf_file]
    else:
        folder = Path(resolve_path(cfg.name))
        if not folder.is_dir():
            folder = _cached_snapshot(cfg.name)
            if folder is None:  # not in the local hub cache: nothing to read
                return None
        files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
    if not files or not all(f.is_file() for f in files):
        return None
    h = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            for i in range(IDENTITY_CHUNKS):
                f.seek(i * max(0, size - IDENTITY_CHUNK_BYTES) // max(1, IDENTITY_CHUNKS - 1))
                h.update(f.read(IDENTITY_CHUNK_BYTES))
    return h.hexdigest()[:20]


def classifier_tokenizer(source):
    """A tokenizer that pads on the right, whatever its files say (Llama's say left).

    A classifier pools the last non-pad token and never generates, so left padding buys nothing and
    costs two things: a text's logits then depend on what it is batched with (its positions shift;
    bf16 on an H100: up to 0.004 apart, exactly equal with right padding), and under a causal mask a
    left pad attends to nothing, a row some CUDA attention kernels turn into NaN (reported upstream
    for transformers 5; not reproduced here)."""
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.padding_side = "right"
    return tokenizer


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer with a pad token set deliberately (decoders often ship without one)."""
    source = local_or_hub(cfg.tokenizer, "model.tokenizer") if cfg.tokenizer else weights_path(cfg)
    try:
        tokenizer = classifier_tokenizer(source)
    except OSError as e:
        if Path(source).exists():
            raise
        raise OSError(f"model {source!r}: no such local directory (relative to {Path.cwd()}), and fetching it "
                      f"from the hub failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            # Llama/TinyLlama: no pad token. EOS is a safe pad for classification because the
            # tokenizer never appends it to inputs, so "last non-pad token" is the last real one.
            # (unk is not used: the auto mask policy masks into unk, and mask must differ from pad.)
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


def prepare_tokenizer(cfg: ModelConfig) -> tuple[object, MaskToken]:
    """Tokenizer plus the resolved mask token (``new`` adds ``<mask>`` to the tokenizer)."""
    tokenizer = load_tokenizer(cfg)
    return tokenizer, resolve_mask_token(tokenizer, cfg.mask_policy)


def head_name(model) -> str:
    base = getattr(model, "get_base_model", lambda: model)()
    for name in HEAD_NAMES:
        if isinstance(getattr(base, name, None), torch.nn.Module):
            return name
    raise ValueError(f"{type(base).__name__} has no classification head named {HEAD_NAMES}")


def new_module_names(model, missing_keys) -> list[str]:
    """Modules the checkpoint did not hold, so they start random: the head, and on some models more
    (RoBERTa's two-layer head, DistilBERT's ``pre_classifier``, DeBERTa's ``pooler``, a pooler a
    checkpoint lacks). A frozen one would stay random for good: LoRA trains and saves them all."""
    body = getattr(model, "base_model_prefix", "")
    names = set()
    for key in missing_keys:
        parts = key.split(".")[:-1]  # the module that owns the parameter
        depth = 2 if parts[:1] == [body] else 1  # "classifier", but "bert.pooler", not all of "bert"
        if parts:
            names.add(".".join(parts[:depth]))
    return sorted(names)


def trainable_module_names(model) -> list[str]:
    """What LoRA trains in full and saves with the adapter: the head plus every new module."""
    base = getattr(model, "get_base_model", lambda: model)()
    return sorted({head_name(base), *getattr(base, "tokmask_new_modules", [])})


def input_embedding_name(model) -> str:
    embeddings = model.get_input_embeddings()
    for name, module in model.named_modules():
        if module is embeddings:
            return name.rsplit(".", 1)[-1]
    raise ValueError("could not find the input embedding module")


def quantization_config(cfg: ModelConfig):
    from transformers import BitsAndBytesConfig

    # The head stays unquantised: it is trained in full and saved with the adapter.
    if cfg.quant_bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=DTYPES[cfg.dtype], llm_int8_skip_modules=list(HEAD_NAMES))
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(HEAD_NAMES))


def load_base(cfg: ModelConfig, labels: list[str], tokenizer, seed: int, device: torch.device | None = None):
    """The (possibly quantised) base classifier, pad id set and embeddings sized to the tokenizer.

    Seeds first: the new classification head is initialised here, so the same seed gives the
    same head.
    """
    transformers.set_seed(seed)
    auto = AutoModelForTokenClassification if cfg.task == "token" else AutoModelForSequenceClassification
    kwargs = dict(num_labels=len(labels), id2label=dict(enumerate(labels)),
                  label2id={label: i for i, label in enumerate(labels)}, dtype=DTYPES[cfg.dtype])
    if cfg.task == "sequence":  # so transformers' own loss, and a plain reload, treat the outputs alike
        kwargs["problem_type"] = HF_PROBLEM_TYPES[cfg.problem_type]
    if cfg.method == "qlora":
        kwargs["quantization_config"] = quantization_config(cfg)
        if device is not None and device.type != "cpu":
            kwargs["device_map"] = {"": device}  # bitsandbytes quantises on load to the target device
    # A head of another label count (fine-tuning a fine-tuned classifier) is drawn anew; a body
    # tensor of another shape means the wrong checkpoint, and is refused.
    model, info = auto.from_pretrained(weights_path(cfg), output_loading_info=True, ignore_mismatched_sizes=True,
                                       **kwargs)
    mismatched = [key for key, *_ in info.get("mismatched_keys", [])]
    in_body = [key for key in mismatched if key.split(".")[0] == getattr(model, "base_model_prefix", None)]
    if in_body:
        raise ValueError(f"{cfg.name}: checkpoint tensors of another shape than this model's: {in_body[:4]}; "
                         "is model.name the right checkpoint?")
    model.tokmask_new_modules = new_module_names(model, [*info["missing_keys"], *mismatched])
    # Decoders pool the last non-pad token, found through config.pad_token_id.
    model.config.pad_token_id = tokenizer.pad_token_id
    # A classifier never decodes: without this, every forward pass builds a KV cache it throws
    # away (two copies per layer, and a recompile per layer under torch.compile).
    model.config.use_cache = False
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return model


def classifier_on_body(model, cfg: ModelConfig, labels: list[str], tokenizer, seed: int = 0):
    """A classifier for ``cfg.task`` and ``labels`` whose body *is* ``model``'s body, not a copy.

    PEFT keeps one copy of the base head per adapter, so it cannot hold heads of other label counts
    or tasks (peft#2136); a PEFT model over this classifier can, and its LoRA layers are the body's
    own, holding every task's adapters. Only the head is new (its weights come from the adapter);
    a body module the other task needs and this body lacks (BERT's pooler, which token classifiers
    drop) comes from the checkpoint.
    """
    base = getattr(model, "get_base_model", lambda: model)()
    config = copy.deepcopy(base.config)
    config.num_labels = len(labels)
    config.id2label, config.label2id = dict(enumerate(labels)), {label: i for i, label in enumerate(labels)}
    config.problem_type = HF_PROBLEM_TYPES[cfg.problem_type] if cfg.task == "sequence" else None
    auto = AutoModelForTokenClassification if cfg.task == "token" else AutoModelForSequenceClassification
    with torch.device("meta"):
        shell = auto.from_config(config)
    prefix = shell.base_model_prefix
    body = getattr(base, prefix)
    needed = {name for name, _ in getattr(shell, prefix).named_modules()}
    lacking = needed - {name for name, _ in body.named_modules()}
    tops = sorted(n for n in lacking if n.rpartition(".")[0] not in lacking)
    head = next(getattr(base, head_name(base)).parameters())
    donor = getattr(load_base(cfg, labels, tokenizer, seed, head.device), prefix) if tops else None
    for name in tops:
        parent, _, leaf = name.rpartition(".")
        setattr(body.get_submodule(parent), leaf, donor.get_submodule(name).to(head.device))
    setattr(shell, prefix, body)
    for name, child in shell.named_children():
        if name != prefix:
            child.to_empty(device=head.device).to(head.dtype)
    return shell


def lora_config(cfg: ModelConfig, model, mask_token: MaskToken):
    from peft import LoraConfig, TaskType

    extra = {}
    if mask_token.added:
        # A new <mask> token starts untrained: train (and save) just its embedding row.
        extra["trainable_token_indices"] = {input_embedding_name(model): [mask_token.id]}
    return LoraConfig(
        task_type=TaskType.TOKEN_CLS if cfg.task == "token" else TaskType.SEQ_CLS,
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules, modules_to_save=trainable_module_names(model), **extra)


def build_model(cfg: ModelConfig, labels: list[str], tokenizer, mask_token: MaskToken, seed: int = 0,
                device: torch.device | None = None):
    """Build the classifier to train: the full model, or a PEFT model with head and mask row trainable.

    Args:
        cfg: model section of the recipe (``method`` picks full / lora / qlora).
        labels: label names; their order fixes the ids.
        tokenizer: from :func:`prepare_tokenizer` (pad set, mask token resolved).
        mask_token: the resolved mask token; a new one gets a trainable embedding row.
        seed: seeds the head and the adapter initialisation.
        device: where QLoRA weights are quantised (GPU); ``None`` keeps CPU.
    """
    model = load_base(cfg, labels, tokenizer, seed, device)
    if cfg.method == "full":
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model
    from peft import prepare_model_for_kbit_training

    check_checkpoint_covers_body(model)
    if cfg.method == "qlora":
        check_new_modules_unquantised(model)
        check_cpu_4bit_shapes(model)
        keep_cpu_4bit_differentiable(model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return add_adapter(model, cfg, mask_token, seed)


OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert")
"""Models whose position ids start after the pad id: ``pad_token_id + 1`` positions are not usable."""


def check_positions(config, max_length: int) -> None:
    """Refuse a ``data.max_length`` beyond a model's learned (absolute) positions: the first batch that long
    would fail with an index error deep in the embeddings. Rotary models (Llama, Qwen) extrapolate: not checked."""
    positions = getattr(config, "max_position_embeddings", None)
    if not positions or any(getattr(config, k, None) is not None for k in ("rope_theta", "rope_parameters",
                                                                            "rope_scaling")):
        return
    if getattr(config, "model_type", "") in OFFSET_POSITIONS:
        positions -= (config.pad_token_id or 0) + 1
    if max_length > positions:
        raise ValueError(f"data.max_length={max_length} is beyond the {positions} positions the model has learned "
                         f"(config.max_position_embeddings); set data.max_length <= {positions}")


def check_checkpoint_covers_body(model, most: float = 0.2) -> None:
    """A checkpoint that lacks much of the model is the wrong one for this architecture; LoRA would
    train those random weights in full (they are new modules). Say so instead."""
    names = getattr(model, "tokmask_new_modules", [])
    new = sum(p.numel() for name in names for p in model.get_submodule(name).parameters())
    total = sum(p.numel() for p in model.parameters())
    if new > most * total:
        raise ValueError(f"{model.name_or_path} lacks {new / total:.0%} of a {type(model).__name__}'s weights "
                         f"(new: {names[:6]}); is model.name the right checkpoint?")


def check_new_modules_unquantised(model) -> None:
    """A new (random) module must be trained in full, which a quantised layer cannot be; only the
    heads named ``score``/``classifier`` are kept out of quantisation at load."""
    quantised = [f"{name}.{sub}".rstrip(".") for name in trainable_module_names(model)
                 for sub, module in model.get_submodule(name).named_modules()
                 if type(module).__name__ in ("Linear4bit", "Linear8bitLt")]
    if quantised:
        raise ValueError(f"QLoRA quantised {quantised}, which the checkpoint did not hold (new, random "
                         "weights that must be trained in full); use method: lora for this model")


def check_cpu_4bit_shapes(model, block: int = 64) -> None:
    """bitsandbytes' CPU 4-bit kernels need in-features divisible by the quantisation block; say so
    up front instead of failing inside the first forward pass with a reshape error."""
    bad = [name for name, module in model.named_modules()
           if type(module).__name__ == "Linear4bit" and module.weight.device.type == "cpu"
           and module.in_features % block]
    if bad:
        raise ValueError(f"4-bit QLoRA on CPU needs layer input sizes divisible by {block}; {len(bad)} layer(s) "
                         f"are not (e.g. {bad[0]}). Use quant_bits: 8, a GPU, or method: lora")


def keep_cpu_4bit_differentiable(model) -> int:
    """Keep bitsandbytes' 4-bit layers off their CPU inference layout while they train.

    On a CPU with AVX512-BF16, a ``Linear4bit``'s first forward pass in eval mode repacks its weight for
    an inference kernel (``gemv_4bit``) that has no backward, and nothing packs it back for training:
    after a run's first evaluation, gradients stopped at every frozen 4-bit layer (no input gradient;
    PyTorch warns "silently incorrect"), layers with a bias failed outright, and a sweep's later runs
    trained on a base whose logits had moved by ~1e-3. Training and evaluation now share the
    differentiable path. Returns how many layers were switched.
    """
    switched = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            switched += 1
    return switched


def add_adapter(base, cfg: ModelConfig, mask_token: MaskToken, seed: int):
    """A fresh adapter (and head) on ``base`` for ``seed``, the same whether ``base`` was just
    loaded or kept from an earlier run (a sweep). ``get_peft_model`` mutates ``base`` in place;
    ``PeftModel.unload()`` gives it back."""
    from peft import get_peft_model

    reset_new_modules(base, trainable_module_names(base), seed)
    transformers.set_seed(seed)
    return get_peft_model(base, lora_config(cfg, base, mask_token))


def reset_new_modules(model, names: list[str], seed: int) -> None:
    """Draw the head and other new modules from ``seed``: linear weights normal with std
    ``initializer_range`` and zero bias, norms reset; the same seed gives the same head whether the
    base was just loaded or kept from an earlier run of a sweep."""
    g = torch.Generator().manual_seed(seed)
    std = getattr(model.config, "initializer_range", 0.02)
    with torch.no_grad():
        for name in names:
            for module in model.get_submodule(name).modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.copy_(torch.randn(module.weight.shape, generator=g) * std)
                    if module.bias is not None:
                        module.bias.zero_()
                elif isinstance(module, torch.nn.LayerNorm):
                    module.reset_parameters()


def cast_frozen_linears(model, dtype: torch.dtype) -> int:
    """Store the frozen ``nn.Linear`` weights under LoRA layers in the autocast ``dtype``; returns how many.

    Autocast casts every such weight to ``dtype`` on every forward pass anyway, so the results are
    the same bits; what goes is one cast kernel per layer per step (and half their memory).
    Trainable tensors (adapters, head) stay in full precision.
    """
    count = 0
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if (hasattr(module, "lora_A") and type(base) is torch.nn.Linear and base.weight.dtype != dtype
                and not any(p.requires_grad for p in base.parameters())):
            base.to(dtype)
            count += 1
    return count


def upcast_trainable(model) -> int:
    """Store half-precision trainable tensors in float32; returns how many.

    A LoRA model loaded in bf16 keeps its head (a copy of a bf16 module) in bf16, where AdamW's
    updates are rounded to the weights' 8-bit mantissa: near 0.02 one bf16 step is 1.2e-4, so an
    update of lr 2e-4 moves a weight one or two steps, and once the decaying schedule takes the lr
    below half a step the update is lost. Under autocast the matmuls still run in bf16.
    """
    count = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()
            count += 1
    return count


def prepare_precision(model, method: str, compute_dtype: torch.dtype | None, cast_frozen: bool = True) -> bool:
    """Ready a model for mixed precision in ``compute_dtype`` (``None``: full precision, nothing to do).

    LoRA: the frozen linears under adapters are stored in ``compute_dtype`` (``cast_frozen``; not
    under FSDP, which flattens parameters to one dtype). LoRA/QLoRA: half-precision trainables are
    upcast to fp32 (the head, any new module), so their updates are not rounded away.

    Returns:
        True when frozen linears were cast, so a kept base now holds ``compute_dtype`` weights.
    """
    if compute_dtype is None:
        return False
    cast = method == "lora" and cast_frozen and cast_frozen_linears(model, compute_dtype) > 0
    if method != "full":
        upcast_trainable(model)
    return cast


def compile_blocks(model, **compile_kwargs) -> int:
    """``torch.compile`` each repeated block (decoder or encoder layer) in place; returns how many.

    Compiling one block class rather than the whole model is PyTorch's regional compilation: the
    layers share one compiled graph, so compile time is that of one layer, and the step loses most
    of its per-op Python and kernel launches. In place (``nn.Module.compile``), so parameter names,
    hooks and adapter files are as without it.
    """
    blocks, inside = [], ()
    for name, modules in model.named_modules():
        if (isinstance(modules, torch.nn.ModuleList) and len(modules) > 1 and len({type(m) for m in modules}) == 1
                and not name.startswith(inside)):  # outermost only: not a block's own list of experts
            blocks += list(modules)
            inside += (name + ".",)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no repeated blocks (a ModuleList of layers) to compile")
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)


def parameter_counts(model) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": int(trainable), "total_params": int(total)}
