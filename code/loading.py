"""What a PPO run loads, beside code/ppo.py (the lesson): the four roles and the prompts.

    models and tokenizers   load_model, load_tokenizer: local folders or hub names, every refusal one clear line
    stop tokens             stop_token_ids: the ids that end a reply (chat models end turns with their own tokens)
    LoRA                    add_adapters (peft), AdaptersOff: a frozen role that is a trained one with adapters off;
                            share_frozen_base: a critic made of the actor reads the actor's frozen weights
    the reward              RewardScorer (a reward model, three ways of reading it), RewardFunction (a .py file)
    the four roles          Roles, load_roles: which role comes from where, decided in one place
    prompts                 load_prompts: JSON, JSONL or Parquet files in Alpaca, chat, ShareGPT or prompt format

Settings reach this module as arguments (the config dict `c` of code/ppo.py); it never imports ppo.
"""
import contextlib
import dataclasses
import importlib.util
import inspect
import json
import math
import os
import signal
import threading
import typing
import warnings

import numpy as np
import pandas as pd
import torch

# peft calls a transformers method that transformers 5 renamed, and transformers warns each time (3 times a LoRA run)
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


class ConfigError(Exception):
    """An expected mistake in the user's input: reported as one line, exit code 2, no traceback."""


class Prompt(typing.NamedTuple):
    """One prompt of a prompt file, as the run uses it (outputs are never read)."""
    conv: object  # the conversation: a text (one user turn) or a list of {role, content} turns up to the last user's
    text: str     # what the actor sees: the conversation through its chat template, with the generation prompt
    ids: list     # the token ids of text


# ---- tensors every role reads: the trainer's padding, left-padded prompts, model inputs ---------------------------
# The trainer's own padding id: never a real token (OAI pads with an id beyond the vocabulary; N+ adds a [PAD] token
# without resizing the embeddings), never embedded (model_inputs maps masked slots to 0), never written into a saved
# tokenizer or config. Every mask is carried explicitly, so no mask is ever derived from `ids != PAD`.
PAD_ID = -1


def last_index(mask):
    """Index of the last True in each row (the last real token); 0 for an all-False row."""
    idx = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask, idx, -1).max(1).values.clamp(min=0)


def left_pad(rows, pad_id, device):
    """Id lists -> left-padded (ids, attention_mask): every prompt ends at the same column, replies start after it."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = True
    return ids.to(device), mask.to(device)


def position_ids_of(attention_mask):
    """Positions that count real tokens only, so left padding does not shift them (implementation details #2)."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def model_inputs(ids, attention_mask):
    """Pad slots -> id 0 before the embedding lookup: an added pad token may lie beyond the embedding table, and
    masked slots are never attended to, so any valid id will do (N+, TRL)."""
    return ids.masked_fill(~attention_mask.bool(), 0)



# ---- models and tokenizers: from_pretrained, with one clear line for each usual mistake ---------------------------
def check_model_path(path, role):
    """A local folder must exist; anything shaped like a hub name ("org/name") is left to from_pretrained."""
    if not path:
        raise ConfigError(f"{role}: no model path given")
    looks_local = path.startswith((".", "/", "~")) or path.count("/") != 1 or os.path.exists(path)
    if looks_local and not os.path.isdir(path):
        raise ConfigError(f"{role}: model folder {path!r} not found; give a local folder with config.json, or a hub "
                          f"name like Qwen/Qwen2.5-0.5B-Instruct (on a machine that reaches the hub)")


def first_line(e):
    """An exception as one short line: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def remote_code_error(role, path, model_type):
    return ConfigError(f"{role}: {path!r} needs its own Python code (model_type {model_type!r} is not an architecture "
                       f"transformers {__import__('transformers').__version__} ships); code from a model folder is "
                       f"never run here: use a checkpoint of a built-in architecture, or a transformers that has it")


def read_config(path, role):
    """AutoConfig of a local folder or hub name. Code from a model folder never runs (trust_remote_code=False,
    passed explicitly: otherwise transformers may ask on a terminal, and a "y" runs it). One clear line for a
    config.json that is not JSON, a checkpoint that needs its own code, and a hub name without the hub."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    check_model_path(path, role)
    local = os.path.isdir(path)
    if local:
        file = os.path.join(path, "config.json")
        if not os.path.isfile(file):
            raise ConfigError(f"{role}: {path!r} has no config.json; give a folder written by save_pretrained")
        try:
            with open(file, encoding="utf-8") as f:
                raw = json.load(f)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both are
            raise ConfigError(f"{role}: {file} is not valid JSON ({first_line(e)}); restore it from the model's "
                              f"source") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{role}: {file} is not a model config (a JSON object); restore it from the source")
        if "auto_map" in raw and raw.get("model_type") not in CONFIG_MAPPING:
            raise remote_code_error(role, path, raw.get("model_type"))
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # the user's files or a hub name: any failure is theirs to fix, reported in one line
        if "trust_remote_code" in str(e):
            raise remote_code_error(role, path, "?") from None
        if local:
            raise ConfigError(f"{role}: cannot read the config of {path!r} ({first_line(e)})") from None
        raise ConfigError(f"{role}: cannot load {path!r} ({first_line(e)}); offline, download the model once and "
                          f"pass its local folder") from None


def max_positions(model):
    """The longest sequence the model has learned positions for (config.max_position_embeddings: GPT-2's n_positions,
    OPT's 2048, a rotary model's trained context; the text part of a multimodal config); None if it names none."""
    return getattr(model.config.get_text_config(), "max_position_embeddings", None)


def load_model(kind, path, role, device, dtype, fresh_value_head=False, label=""):
    """from_pretrained by local path or hub name, with one clear line for the usual mistakes.
    kind "causal" -> whatever AutoModelForCausalLM loads and gives logits over the vocabulary: ...ForCausalLM, and
    the ...ForConditionalGeneration checkpoints it loads for text (Gemma 3 4B and larger).
    kind "score" -> ScoreModel around a decoder ...ForSequenceClassification model with one output, read at chosen
    positions (the critic). fresh_value_head: built from a causal LM checkpoint with a zero-initialised head (V = 0 at
    the start, as OAI's value head), for a critic that must read the actor's tokens.
    kind "reward" -> ScoreModel around any ...ForSequenceClassification model (the frozen judge): a decoder is read at
    the last real token, an encoder classifier (DeBERTa, RoBERTa, DistilBERT) through its own pooling; with several
    outputs, `label` (REWARD_LABEL) names the one that scores."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    config = read_config(path, role)
    archs = config.architectures or []
    if kind == "causal" and archs and not any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))
                                              for a in archs):
        raise ConfigError(f"{role}: {path!r} is a {archs[0]}, not a causal LM; the actor and reference must be "
                          f"...ForCausalLM models (the reward model goes in REWARD_MODEL)")
    if kind != "causal" and archs and not fresh_value_head and not any("ForSequenceClassification" in a for a in archs):
        raise ConfigError(f"{role}: {path!r} is a {archs[0]}, not a sequence-classification model; give a reward "
                          f"model (...ForSequenceClassification)")
    quantised = getattr(config, "quantization_config", None)
    if quantised:
        method = quantised.get("quant_method", "?") if isinstance(quantised, dict) else type(quantised).__name__
        raise ConfigError(f"{role}: {path!r} is a quantised checkpoint ({method}); quantised bases (QLoRA's 4-bit, "
                          f"GPTQ, AWQ) are not supported: give the full-precision model (--lora_r=16 trains it with "
                          f"LoRA adapters over a frozen base stored in DTYPE)")
    if getattr(config, "activation_function", None) == "gelu_new":
        # GPT-2's gelu_new is the tanh approximation of GELU written as 8 Python-level ops; PyTorch's
        # F.gelu(approximate="tanh") computes the same function in one kernel (equal to ~1e-7; README, Performance)
        config.activation_function = "gelu_pytorch_tanh"
    for key, value in config.to_dict().items():  # no dropout in any role (Ziegler et al. 2019; N+ disable_dropout)
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key):
            setattr(config, key, 0.0)
    if fresh_value_head:
        config.num_labels = 1
    auto = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    try:
        model = auto.from_pretrained(path, config=config, dtype=dtype, trust_remote_code=False)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # the user's files: reported in one line, whatever transformers raised
        if isinstance(e, ValueError) and "Unrecognized configuration class" in str(e):
            what = ("a causal LM (AutoModelForCausalLM" if kind == "causal"
                    else "a sequence-classification model (AutoModelForSequenceClassification")
            raise ConfigError(f"{role}: {path!r} ({config.model_type}, {archs[0] if archs else 'no architecture'}) "
                              f"cannot be loaded as {what} has no class for {config.model_type!r})") from None
        raise ConfigError(f"{role}: cannot load the weights of {path!r} ({first_line(e)}); if the files are "
                          f"truncated or corrupt, copy them again from the model's source") from None
    for m in model.modules():  # modules that copied their rate before the config was changed
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    if kind == "causal":
        if model.get_output_embeddings() is None:
            raise ConfigError(f"{role}: {path!r} loads as {type(model).__name__}, which has no language-model head; "
                              f"the actor and reference must give logits over the vocabulary")
        return model.to(device).eval()
    if kind == "score" and not hasattr(model, "score"):
        raise ConfigError(f"{role}: {type(model).__name__} has no `score` head to read a value at every token; use a "
                          f"decoder ...ForSequenceClassification model (GPT-2, Llama, Qwen2, ...), or --critic_model= "
                          f"for the default")
    index = output_index(model.config, label, role, path)
    if fresh_value_head:
        with torch.no_grad():
            model.score.weight.zero_()
            if getattr(model.score, "bias", None) is not None:
                model.score.bias.zero_()
    return ScoreModel(model, index).to(device).eval()


def output_index(config, label, role, path):
    """Which output of a classifier is the score: the only one, or REWARD_LABEL (an index or a label name, e.g.
    "POSITIVE" of a sentiment classifier; its raw logit is the score, as in TRL's sentiment examples)."""
    names = [str(config.id2label.get(i, i)) for i in range(config.num_labels)]
    if label == "":
        if config.num_labels == 1:
            return 0
        fix = ("a value model needs exactly one (num_labels = 1)" if role == "CRITIC_MODEL" else
               "a reward model needs exactly one, or --reward_label=NAME (or index) naming the one that scores")
        raise ConfigError(f"{role}: {path!r} has {config.num_labels} outputs ({', '.join(names)}); {fix}")
    if label.isdigit() and int(label) < len(names):
        return int(label)
    if label in names:
        return names.index(label)
    raise ConfigError(f"REWARD_LABEL {label!r} is not an output of {path!r}; its outputs are "
                      f"{', '.join(f'{i} = {n}' for i, n in enumerate(names))}")


def load_tokenizer(path, role):
    """The model's own tokenizer, left-padding, never running code from its folder. Training pads with PAD_ID and
    explicit masks, so the tokenizer's pad token only matters to users of the saved model: a tokenizer without one
    gets its EOS as pad (a real token), so that batched generate() works with the tokenizer saved beside the actor."""
    from transformers import AutoTokenizer
    read_config(path, role)  # the folder's config.json first: its errors are clearer than the tokenizer's
    try:
        tok = AutoTokenizer.from_pretrained(path, padding_side="left", trust_remote_code=False)
    except Exception as e:  # the user's files: any failure is theirs to fix, reported in one line
        if "trust_remote_code" in str(e):
            raise remote_code_error(role, path, "?") from None
        raise ConfigError(f"{role}: cannot load the tokenizer of {path!r} ({first_line(e)}); the folder needs the "
                          f"model's tokenizer files (tokenizer.json, tokenizer_config.json, ...)") from None
    notes = []
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
        notes.append(f"{role}: the tokenizer has no pad token; its EOS {tok.eos_token!r} pads in the saved tokenizer "
                     f"(training pads with masks, never with a token)")
    return tok, notes


def check_tokenizer_fits(tok, model, path, role):
    """A folder without tokenizer files still gives a tokenizer: transformers builds a stand-in of a handful of tokens
    from the model type, and a run with it 'succeeds' on one-token replies. A real tokenizer covers most of the
    embedding table (tables are padded a little past it: Qwen2.5 has 151,665 tokens in 151,936 rows)."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tok) < rows // 2:
        raise ConfigError(f"{role}: the tokenizer of {path!r} has {len(tok)} tokens for {rows} embedding rows: the "
                          f"folder lacks the model's tokenizer files; copy tokenizer.json and tokenizer_config.json "
                          f"(or its vocabulary files) from where the model came from")


def stop_token_ids(tok, model, override):
    """The ids that end a reply: the EOS ids of the actor's generation_config (an int or a list) and the tokenizer's
    EOS, or STOP_TOKENS (token texts or ids, comma-separated) instead. Chat models end a turn with a token other than
    the tokenizer's EOS (Llama-3-Instruct <|eot_id|>, Gemma-it <end_of_turn>, Qwen2.5-Instruct lists two ids): with the
    EOS alone such a model never ends a reply."""
    if override:
        ids = []
        for item in (x.strip() for x in override.split(",")):
            i = int(item) if item.isdigit() else tok.convert_tokens_to_ids(item)
            if i is None or not 0 <= i < len(tok) or (i == tok.unk_token_id and item != tok.unk_token):
                raise ConfigError(f"STOP_TOKENS: {item!r} is not one token of the actor's tokenizer; give token texts "
                                  f"as the tokenizer writes them (e.g. <|eot_id|>) or ids below {len(tok)}")
            ids.append(i)
    else:
        eos = getattr(model.generation_config, "eos_token_id", None)
        ids = ([eos] if isinstance(eos, int) else list(eos or [])) + [tok.eos_token_id]
    ids = sorted({i for i in ids if i is not None})
    if not ids:
        raise ConfigError("ACTOR_MODEL: neither its tokenizer nor its generation_config names an EOS token; name the "
                          "tokens that end a reply with --stop_tokens=...")
    return ids


def freeze(model):
    """Reference and reward model: eval(), no gradients, no optimizer state."""
    model.requires_grad_(False)
    return model.eval()


def frozen_forward(model, fn, *args, rows=0):
    """fn(model, *args) for a frozen model, under inference_mode (no_grad for a trained model with its adapters off:
    FSDP's gathered weights must not become inference tensors); with rows, on that many rows of the tensor
    arguments at a time, concatenated (so a forward holds the logits of at most MINI_BATCH_SIZE rows, as the update
    does). A model kept on the CPU between uses (OFFLOAD_FROZEN) visits the inputs' device for the call. The result
    is cloned outside inference_mode so that later autograd ops may read it."""
    device, n = args[0].device, len(args[0])
    visiting = next(model.parameters()).device != device
    if visiting:
        model.to(device)
    with torch.no_grad() if isinstance(model, AdaptersOff) else torch.inference_mode():
        out = torch.cat([fn(model, *(a[i:i + rows] if torch.is_tensor(a) else a for a in args))
                         for i in range(0, n, rows)]) if rows and rows < n else fn(model, *args)
    if visiting:
        model.to("cpu")
    return out.clone()


def add_adapters(model, c, task):
    """LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685) through peft,
    in place: every base weight frozen, beside each targeted layer a trainable update B·A·(alpha/r) with B = 0 at the
    start, so the adapted model is exactly the base model at step 0 (step-1 KL = 0); no LoRA dropout (no dropout
    anywhere in PPO). task "SEQ_CLS" (the critic) also gives the model a trainable copy of its score head, the value
    head, keeping the original for when the adapters are off. What trains is kept in fp32 (master weights) whatever
    the base's dtype. Returns the PeftModel (adapters off, save, merge); `model` itself now runs with the adapters."""
    try:
        import peft
    except ImportError:
        raise ConfigError("LORA_R > 0 needs the peft package: pip install peft (or --lora_r=0 for full "
                          "fine-tuning)") from None
    names = c["LORA_TARGET_MODULES"]
    targets = names if names == "all-linear" else [n.strip() for n in names.split(",") if n.strip()]
    config = peft.LoraConfig(r=c["LORA_R"], lora_alpha=c["LORA_ALPHA"], lora_dropout=0.0, target_modules=targets,
                             bias="none", task_type=task)
    with warnings.catch_warnings():  # GPT-2's Conv1D layers store weights transposed; peft notes it and adapts
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        try:
            peft_model = peft.get_peft_model(model, config)
        except ValueError as e:  # names that match no layer of this model
            raise ConfigError(f"LORA_TARGET_MODULES {names!r}: {first_line(e)}; give layer names of this model "
                              f"(e.g. q_proj,v_proj for Llama, c_attn for GPT-2) or all-linear") from None
    for p in peft_model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return peft_model


@dataclasses.dataclass
class Adapter:
    """A trained model's LoRA adapters: its peft model, and how to load its base again (to save it merged)."""
    peft: object
    load_base: object


class AdaptersOff:
    """A frozen role that shares a trained role's weights under LoRA: the trained model called with its adapters
    switched off (peft's disable_adapter), which is exactly the base it started from, original score head included.
    The Reference is the actor without its adapters, the Reward model the critic without its adapters: no second
    copy in memory. Everything but the call (config, parameters(), ...) reads through to the wrapped module."""

    def __init__(self, module, peft_model):
        self.module, self.peft_model = module, peft_model

    def __call__(self, *args, **kwargs):
        with self.peft_model.disable_adapter():
            return self.module(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.module, name)


def share_frozen_base(actor, critic):
    """Under LoRA a critic made of the actor's checkpoint and a fresh value head holds the actor's frozen base
    weights, not a second copy of them (one backbone in memory, two sets of adapters): each parameter of the critic's
    backbone reads the storage of the actor's parameter of the same name. Both stay frozen; the adapters never
    write to the base, and the merge at save copies before it adds (peft's safe_merge)."""
    own = {n.replace(".base_layer", ""): p  # the actor's adapters are in place: its layers' weights are base_layer's
           for n, p in getattr(actor, actor.base_model_prefix).named_parameters()}
    for name, p in getattr(critic, critic.base_model_prefix).named_parameters():
        if name in own and own[name].shape == p.shape and own[name].dtype == p.dtype:
            p.data = own[name].data


def trainable_parameters(modules):
    """What the optimizer steps: every weight in full fine-tuning; adapters and the value head under LoRA."""
    return [p for m in modules for p in m.parameters() if p.requires_grad]


class ScoreModel(torch.nn.Module):
    """A ...ForSequenceClassification model (reward model or critic) read as scalars: output `index` of a decoder's
    backbone + `score` head at the positions we choose. positions: a [B] index tensor -> [B] (one per row), or a
    slice -> [B, len]. (The model's own pooling guesses the last real token from pad ids; we know it.) An encoder
    classifier has no `score` head (own_pooling): it reads its own tokens through its own pooling ([CLS] and a
    classifier head), [B]. A module of its own so that DDP and FSDP wrap exactly what the critic's training forward
    runs."""

    def __init__(self, model, index=0):
        super().__init__()
        self.model, self.index = model, index
        self.own_pooling = not hasattr(model, "score")

    def forward(self, input_ids, attention_mask, positions=None, token_type_ids=None):
        if self.own_pooling:  # the encoder's own ids, padding and positions, as its tokenizer made them
            extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits[:, self.index].float()
        backbone = getattr(self.model, self.model.base_model_prefix)
        hidden = backbone(input_ids=model_inputs(input_ids, attention_mask), attention_mask=attention_mask,
                          position_ids=position_ids_of(attention_mask), use_cache=False).last_hidden_state
        rows = slice(None) if isinstance(positions, slice) else torch.arange(len(hidden), device=hidden.device)
        return self.model.score(hidden[rows, positions])[..., self.index].float()


def call(model, *args):
    """model(*args), as a function for frozen_forward."""
    return model(*args)



class RewardScorer:
    """Scores prompt + reply with the frozen reward model (implementation details #10), one of three ways:
    - a decoder RM with the actor's tokenizer: the actor's ids as they are, read at the last real token;
    - a decoder RM with another tokenizer: the reply is decoded (up to its stop token) and the conversation
      re-tokenised by the RM's tokenizer, through its chat template when it has one (prompt as user turn, reply as
      assistant turn), with the RM's EOS only when the reply ended; read at its last real token, keeping the last
      max_len tokens when the conversation is longer than the RM's positions;
    - an encoder classifier (own_pooling: DeBERTa-v3 reward models, DistilBERT/RoBERTa sentiment classifiers): its own
      tokenizer and pooling, (prompt, reply) encoded as a text pair (or through its chat template if it has one),
      padded on the right and truncated to its positions by its tokenizer."""

    def __init__(self, model, tok, actor_tok, device):
        self.model, self.tok, self.actor_tok, self.device = model, tok, actor_tok, device
        self.same_tokenizer = not model.own_pooling and tok.get_vocab() == actor_tok.get_vocab()
        self.max_len = max_positions(model.model)
        if model.own_pooling:
            tok.padding_side = "right"  # an encoder's text starts at position 0, as in its training
        # segment ids for a text pair, where the model takes them (BERT, DeBERTa; not DistilBERT, RoBERTa)
        self.token_types = "token_type_ids" in inspect.signature(model.model.forward).parameters

    def rm_ids(self, conv, reply, ended):
        """RM token ids of one conversation: the same layout the actor's ids have (templated prompt with the
        generation prompt, then the reply, then EOS only if the reply ended), in the RM's own tokens."""
        prompt = format_prompt(self.tok, conv)
        ids = self.tok(prompt, add_special_tokens=not self.tok.chat_template)["input_ids"] \
            + self.tok(reply, add_special_tokens=False)["input_ids"]
        return ids + [self.tok.eos_token_id] if ended and self.tok.eos_token_id is not None else ids

    def __call__(self, query_responses, attention_mask, context_length, prompts, replies, ended):
        """[B] scores; prompts: the (conversation, prompt text, ids) of each row."""
        if self.same_tokenizer:
            return frozen_forward(self.model, call, query_responses, attention_mask, last_index(attention_mask))
        if self.model.own_pooling:
            kw = dict(padding=True, truncation=True, max_length=self.max_len, return_tensors="pt")
            if self.tok.chat_template:
                enc = self.tok([format_prompt(self.tok, p.conv) + r for p, r in zip(prompts, replies)],
                               add_special_tokens=False, **kw)
            else:
                enc = self.tok([conversation_text(p.conv) for p in prompts], list(replies), **kw)
            return frozen_forward(self.model, call, enc["input_ids"].to(self.device),
                                  enc["attention_mask"].to(self.device), None,
                                  enc["token_type_ids"].to(self.device) if self.token_types and "token_type_ids" in enc
                                  else None)
        rows = [self.rm_ids(p.conv, r, e) for p, r, e in zip(prompts, replies, ended)]
        ids, mask = left_pad([r[-self.max_len:] if self.max_len else r for r in rows], PAD_ID, self.device)
        return frozen_forward(self.model, call, ids, mask, last_index(mask))


class ScoreTimeout(BaseException):
    """A score() call ran past SCORE_TIMEOUT (a BaseException, so that the user's own `except Exception` in the
    function does not swallow it)."""


@contextlib.contextmanager
def time_bound(seconds):
    """Raise ScoreTimeout in the block after `seconds` (0 = no bound). A SIGALRM timer: the main thread of a POSIX
    process only (elsewhere there is no bound)."""
    if not seconds or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum, frame):
        raise ScoreTimeout
    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def load_score_fn(path, what, timeout=0.0):
    """score(prompts, responses) -> list[float] from a Python file (GOLD_REWARD, or a reward function in
    REWARD_MODEL / REWARD_FN), checked on every call: one value per reply, all finite, back within `timeout`
    seconds (SCORE_TIMEOUT; 0 = no bound). A file that calls sys.exit() (an unguarded script block), at import or
    in score(), is an error of that file, not the end of the run."""
    off = {"GOLD_REWARD": "--gold_reward= to turn it off", "REWARD_FN": "--reward_fn= to turn it off",
           "REWARD_MODEL": "a reward model folder instead"}[what]
    if not os.path.isfile(path):
        raise ConfigError(f"{what} file {path!r} not found; give a .py file with score(prompts, responses), or {off}")
    spec = importlib.util.spec_from_file_location(f"score_fn_{what.lower()}", path)
    mod = importlib.util.module_from_spec(spec)
    late = (f"did not return within SCORE_TIMEOUT = {timeout:g} s; make it faster, or raise --score_timeout "
            f"(0 = no bound)")
    try:
        with time_bound(timeout):
            spec.loader.exec_module(mod)
    except SystemExit as e:
        raise ConfigError(f"{what} {path!r} called sys.exit({e.code!r}) while being imported; put its script code "
                          f"under `if __name__ == \"__main__\":`") from None
    except ScoreTimeout:
        raise ConfigError(f"{what} {path!r}: importing it {late}") from None
    except Exception as e:  # the user's file: any import error is theirs to fix, reported in one line
        raise ConfigError(f"{what} {path!r} failed to import: {type(e).__name__}: {e}") from None
    if not callable(getattr(mod, "score", None)):
        raise ConfigError(f"{what} {path!r} has no function score(prompts, responses)")

    def score(prompts, responses):
        try:
            with time_bound(timeout):
                out = [float(x) for x in mod.score(prompts, responses)]
        except SystemExit as e:
            raise ConfigError(f"{what} {path!r}: score() called sys.exit({e.code!r}); return one score per reply "
                              f"instead") from None
        except ScoreTimeout:
            raise ConfigError(f"{what} {path!r}: score() {late}") from None
        except Exception as e:  # the user's function: reported in one line, whatever it raised
            raise ConfigError(f"{what} {path!r}: score() failed ({first_line(e)}); fix the function, or "
                              f"{off}") from None
        if len(out) != len(responses):
            raise ConfigError(f"{what} {path!r}: score() returned {len(out)} values for {len(responses)} replies")
        if not all(math.isfinite(x) for x in out):
            raise ConfigError(f"{what} {path!r}: score() returned NaN or infinity")
        return out
    return score


class RewardFunction:
    """A rule-based ("verifiable") reward: score(prompts, responses) -> list[float] from a .py file, the GOLD_REWARD
    contract, called with the prompt texts the policy saw and the decoded replies (answer checking, format rules).
    With rm (REWARD_FN beside a reward model) its score is added to the reward model's, e.g. a format penalty."""

    def __init__(self, path, what, device, rm=None, timeout=0.0):
        self.fn, self.device, self.rm = load_score_fn(path, what, timeout), device, rm

    def __call__(self, query_responses, attention_mask, context_length, prompts, replies, ended):
        scores = torch.tensor(self.fn([p.text for p in prompts], list(replies)), dtype=torch.float32,
                              device=self.device)
        if self.rm is None:
            return scores
        return self.rm(query_responses, attention_mask, context_length, prompts, replies, ended) + scores


# ---- data: prompt file -> prompts -----------------------------------------------------------------------------------
def read_records(path, what):
    """The records of a prompt file: a JSON list, JSONL, or Parquet (through pandas, which needs pyarrow)."""
    if not os.path.isfile(path):
        raise ConfigError(f"{what} {path!r} not found; give a JSON, JSONL or Parquet file of prompt records")
    if path.endswith(".parquet"):
        try:
            rows = pd.read_parquet(path).to_dict("records")
        except ImportError:
            raise ConfigError(f"{what} {path!r}: reading Parquet needs pyarrow: pip install pyarrow") from None
        except Exception as e:  # the user's file: any failure is theirs to fix, reported in one line
            raise ConfigError(f"{what} {path!r} cannot be read as Parquet ({first_line(e)})") from None
        rows = [plain(r) for r in rows]
    else:
        try:  # utf-8-sig: a byte-order mark, as some editors write one, is read and dropped
            with open(path, encoding="utf-8-sig") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise ConfigError(f"{what} {path!r} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
        rows = parse_json_or_jsonl(text, path, what)
    if not isinstance(rows, list) or not rows:
        raise ConfigError(f"{what} {path!r} holds no records; expected a non-empty list of prompt records")
    return rows


def parse_json_or_jsonl(text, path, what):
    """A JSON document (a list of records, or one record) or JSONL (one record per line). A JSONL file with damaged
    lines among good ones names the first damaged line; a file that is neither names where JSON parsing failed."""
    try:
        rows = json.loads(text)
        return [rows] if isinstance(rows, dict) else rows
    except json.JSONDecodeError as whole:
        rows, bad = [], []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    bad.append((number, e))
        if bad and rows:  # JSONL with damaged lines
            (number, e), more = bad[0], len(bad) - 1
            raise ConfigError(f"{what} {path!r}: line {number} is not valid JSON ({e.msg} at column {e.colno})"
                              + (f", and {more} more lines" if more else "")
                              + "; the other lines read as JSONL (one record per line): fix or remove it") from None
        if bad:
            raise ConfigError(f"{what} {path!r} is neither JSON nor JSONL ({whole.msg} at line {whole.lineno} column "
                              f"{whole.colno}); expected a list of prompt records (Alpaca, chat, ShareGPT or "
                              f"prompt)") from None
        return rows


def plain(x):
    """A Parquet cell as JSON would give it: arrays -> lists, missing values (NaN, None) -> None."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [plain(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


# Prompt formats: the key that marks each (checked in this order on a file's first record) and what it holds
PROMPT_FORMATS = {
    "messages": "chat: 'messages', a list of {role, content} turns",
    "conversations": "ShareGPT: 'conversations', a list of {from, value} turns",
    "prompt": "prompt: 'prompt', a text or a list of {role, content} turns",
    "instruction": "Alpaca: 'instruction' text (+ optional 'input')",
}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def user_text(record):
    """User turn = instruction, newline, input (LLaMA-Factory's Alpaca conversion)."""
    inp = record.get("input") or ""
    return record["instruction"] + ("\n" + inp if inp else "")


def conversation(record, key):
    """A record -> the prompt: a text (one user turn: Alpaca, a 'prompt' text) or a list of {role, content} turns up
    to and including the last user turn (system turns kept, a trailing assistant turn dropped: the reply to it is
    what PPO samples). None when the record does not fit its file's format. Outputs are never read."""
    if key == "instruction":
        ok = isinstance(record.get("instruction"), str) and isinstance(record.get("input") or "", str)
        return user_text(record) if ok else None
    turns = record.get(key)
    if key == "prompt" and isinstance(turns, str):
        return turns
    if key == "conversations" and isinstance(turns, list):
        turns = [{"role": SHAREGPT_ROLES.get(t.get("from")), "content": t.get("value")} if isinstance(t, dict)
                 else None for t in turns]
    if not isinstance(turns, list) or not all(isinstance(t, dict) and t.get("role") in ("system", "user", "assistant")
                                              and isinstance(t.get("content"), str) for t in turns):
        return None
    users = [i for i, t in enumerate(turns) if t["role"] == "user"]
    return [{"role": t["role"], "content": t["content"]} for t in turns[:users[-1] + 1]] if users else None


def user_turn(conv):
    """The text of a prompt's last user turn (the question the reply answers)."""
    return conv if isinstance(conv, str) else [t["content"] for t in conv if t["role"] == "user"][-1]


def conversation_text(conv):
    """A prompt as one text (an encoder reward model's first segment, a base model's prompt): the turns' contents."""
    return conv if isinstance(conv, str) else "\n".join(t["content"] for t in conv)


def format_prompt(tok, conv):
    """The prompt the actor sees: its chat template with the generation prompt, or plain text for base models.
    conv: a text (one user turn) or a list of {role, content} turns."""
    if not tok.chat_template:
        return conversation_text(conv) + "\n"
    turns = [{"role": "user", "content": conv}] if isinstance(conv, str) else conv
    try:
        return tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # the model folder's template (Jinja): its errors are the user's to fix
        raise ConfigError(f"the chat template of {tok.name_or_path!r} fails on a user turn ({first_line(e)}); fix "
                          f"chat_template in its tokenizer_config.json or chat_template.jinja") from None


def prompt_budget(c, models):
    """The prompt tokens a run can take: MAX_PROMPT_TOKENS, or fewer where a prompt + MAX_NEW_TOKENS would pass the
    learned positions of a model that reads the actor's tokens (GPT-2 1024, OPT 2048: past them generation crashes).
    models: [(role, model)]. Returns (budget, (what sets it, how to raise it)) for load_prompts."""
    limits = sorted((max_positions(m), role) for role, m in models if max_positions(m))
    if not limits or limits[0][0] - c["MAX_NEW_TOKENS"] >= c["MAX_PROMPT_TOKENS"]:
        return c["MAX_PROMPT_TOKENS"], None
    positions, role = limits[0]
    if positions - c["MAX_NEW_TOKENS"] < 1:
        raise ConfigError(f"MAX_NEW_TOKENS = {c['MAX_NEW_TOKENS']} leaves no room for a prompt in the {positions} "
                          f"positions of {role}; lower --max_new_tokens")
    return positions - c["MAX_NEW_TOKENS"], (f"{positions - c['MAX_NEW_TOKENS']} tokens ({positions} positions of "
                                             f"{role} - MAX_NEW_TOKENS = {c['MAX_NEW_TOKENS']})",
                                             "lower --max_new_tokens")


def load_prompts(path, tok, max_tokens, what, log=print, why=None):
    """-> list of Prompt (conversation, templated text, ids); prompts over max_tokens are dropped with a warning.
    The format is detected once per file, from its first record, and said. why: (what sets max_tokens, how to
    raise it), from prompt_budget; None: MAX_PROMPT_TOKENS."""
    why = why or (f"MAX_PROMPT_TOKENS = {max_tokens}", "raise --max_prompt_tokens")
    rows = read_records(path, what)
    key = next((k for k in PROMPT_FORMATS if isinstance(rows[0], dict) and k in rows[0]), None)
    if key is None:
        raise ConfigError(f"{what} {path!r}: the first record fits no prompt format; give one of: "
                          + "; ".join(PROMPT_FORMATS.values()))
    convs = [conversation(r, key) if isinstance(r, dict) else None for r in rows]
    bad = [i for i, conv in enumerate(convs) if conv is None]
    if bad:
        raise ConfigError(f"{what} {path!r}: record {bad[0]} (and {len(bad) - 1} more) does not fit the file's format, "
                          f"{PROMPT_FORMATS[key]} with a user turn")
    empty = [i for i, conv in enumerate(convs) if not user_turn(conv).strip()]
    if empty:
        raise ConfigError(f"{what} {path!r}: record {empty[0]} (and {len(empty) - 1} more) has an empty prompt (its "
                          f"last user turn has no text); give every record a prompt, or remove those records")
    log(f"{what} {path}: {len(rows)} records, format {PROMPT_FORMATS[key].split(':')[0]}")
    out = []
    for conv in convs:
        text = format_prompt(tok, conv)
        ids = tok(text, add_special_tokens=not tok.chat_template)["input_ids"]
        if len(ids) <= max_tokens:
            out.append(Prompt(conv, text, ids))
    if not out:
        raise ConfigError(f"{what} {path!r}: all {len(rows)} prompts are longer than {why[0]}; {why[1]}")
    if len(out) < len(rows):
        log(f"warning: {what} {path}: dropped {len(rows) - len(out)} of {len(rows)} prompts longer than {why[0]}")
    return out


def load_prompt_files(c, defaults, roles, sizes, log=print):
    """PROMPT_FILE and EVAL_FILE as Prompts, prompt-only (an 'output' field is never read); prompt + reply must fit
    every model that reads the actor's tokens. Evaluation: EVAL_SIZE prompts, an equal share per process.
    sizes: the run's batch sizes (one rollout batch needs sizes.rollout // sizes.samples prompts); defaults: the
    settings' defaults (check_demo_judges)."""
    models = [("ACTOR_MODEL", roles.actor), ("REF_MODEL", roles.ref)]
    models += [("CRITIC_MODEL", roles.critic.model)] if roles.critic is not None else []
    models += [("REWARD_MODEL", roles.rm.model.model)] if roles.rm and roles.rm.same_tokenizer else []
    budget, why = prompt_budget(c, models)
    prompts = load_prompts(c["PROMPT_FILE"], roles.tok, budget, "PROMPT_FILE", log, why)
    if len(prompts) < sizes.rollout // sizes.samples:
        raise ConfigError(f"PROMPT_FILE has {len(prompts)} usable prompts, fewer than one rollout batch "
                          f"({sizes.rollout // sizes.samples}); add prompts or lower MINI_BATCH_SIZE")
    check_demo_judges(c, defaults)
    ev = load_prompts(c["EVAL_FILE"], roles.tok, budget, "EVAL_FILE", log, why) if c["EVAL_FILE"] else []
    ev = ev[:c["EVAL_SIZE"]] if c["EVAL_SIZE"] else ev
    return prompts, ev[:len(ev) // sizes.world * sizes.world]


def check_demo_judges(c, defaults):
    """The demo's held-out prompts and gold rule judge the demo's task only: with another PROMPT_FILE, leaving either
    at its default would evaluate someone else's model on product reviews without a word. An error instead."""
    def same(k):
        return os.path.realpath(c[k]) == os.path.realpath(defaults[k])
    demo = [k for k in ("EVAL_FILE", "GOLD_REWARD") if c[k] and same(k)]
    if demo and not same("PROMPT_FILE"):
        raise ConfigError(f"{' and '.join(demo)} {'are' if len(demo) > 1 else 'is'} the demo's (held-out review "
                          f"prompts, the demo's gold rule) but PROMPT_FILE is yours: give your own with "
                          + " ".join(f"--{k.lower()}=..." for k in demo) + ", or turn them off with "
                          + " ".join(f"--{k.lower()}=" for k in demo))


# ---- the four roles --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Roles:
    """The four roles of PPO-RLHF, ready to run, whole when load_roles returns them."""
    tok: object              # the actor's tokenizer (left padding); every role reads the actor's tokens
    stop_ids: list           # the token ids that end a reply
    actor: torch.nn.Module   # Actor (policy, trained)
    ref: object              # Reference (frozen); under LoRA it may be the actor with its adapters off
    scorer: object           # Reward: scorer(...) -> [B] scores (RewardScorer, RewardFunction, or both added)
    critic: torch.nn.Module  # Critic (value model, trained; a ScoreModel); None for a critic-free ADVANTAGE
    critic_path: str         # where the critic's weights came from (None without a critic)
    notes: list              # what the loading decided, said at start
    device: torch.device
    dtype: torch.dtype       # the compute dtype (autocast); trained weights are fp32
    rm: object = None        # the RewardScorer of a reward model (None: the reward is a function)
    adapters: dict = dataclasses.field(default_factory=dict)  # LoRA: {"actor"/"critic": Adapter}
    sync_stop: bool = False  # FSDP: every rank takes part in every sampling step (a sharded model needs all ranks)

    def trained(self):
        """The trained models: actor and critic, or the actor alone (critic-free)."""
        return {k: m for k, m in (("actor", self.actor), ("critic", self.critic)) if m is not None}


def load_roles(c, device, dtype, sync_stop=False):
    """The four roles from the config `c`: Actor (trained), Reference (frozen), Reward (frozen), Critic (trained).
    Mixed precision as OpenRLHF/DeepSpeed do it: what trains holds fp32 weights (an update of lr 1e-6 vanishes in
    bf16 weights) and computes in `dtype` under autocast; the frozen models are stored in `dtype`.
    Which role comes from where:
        Actor      ACTOR_MODEL
        Reference  REF_MODEL (default: the actor's path): a frozen copy; under LoRA, when it is the actor's path,
                   the actor with its adapters off (the SFT weights are the actor's base: no second copy)
        Reward     REWARD_MODEL: a reward model (RewardScorer), or a .py reward function (RewardFunction, no model);
                   REWARD_FN adds a function's score to it
        Critic     critic_source(): none (critic-free), CRITIC_MODEL, a trained copy of the reward model, or the
                   actor's weights with a fresh value head; under LoRA, when it is the reward model, the Reward
                   role is the critic with its adapters off, and a fresh-head critic reads the actor's frozen base
    LoRA (LORA_R > 0): only adapters (and the critic's value head) train, in fp32, over a base stored in `dtype`."""
    lora = c["LORA_R"] > 0
    base_dtype = dtype if lora else torch.float32  # a trained model's weights: under LoRA its base is frozen
    tok, notes = load_tokenizer(c["ACTOR_MODEL"], "ACTOR_MODEL")
    actor = load_model("causal", c["ACTOR_MODEL"], "ACTOR_MODEL", device, base_dtype)
    check_tokenizer_fits(tok, actor, c["ACTOR_MODEL"], "ACTOR_MODEL")
    adapters = {"actor": Adapter(add_adapters(actor, c, "CAUSAL_LM"), lambda: load_model(
        "causal", c["ACTOR_MODEL"], "ACTOR_MODEL", torch.device("cpu"), base_dtype))} if lora else {}
    ref_path = c["REF_MODEL"] or c["ACTOR_MODEL"]
    frozen_device = torch.device("cpu") if c["OFFLOAD_FROZEN"] else device
    if lora and ref_path == c["ACTOR_MODEL"]:
        ref = AdaptersOff(actor, adapters["actor"].peft)
    else:
        ref = freeze(load_model("causal", ref_path, "REF_MODEL", frozen_device, dtype))
    rm_model = rm_tok = None
    if not c["REWARD_MODEL"].endswith(".py"):
        rm_tok, rm_notes = load_tokenizer(c["REWARD_MODEL"], "REWARD_MODEL")
        rm_model = freeze(load_model("reward", c["REWARD_MODEL"], "REWARD_MODEL", frozen_device, dtype,
                                     label=c["REWARD_LABEL"]))
        check_tokenizer_fits(rm_tok, rm_model.model, c["REWARD_MODEL"], "REWARD_MODEL")
        notes += rm_notes
    critic_path, how, note = critic_source(c, tok, rm_model, rm_tok)
    fresh, critic, judge = how == "fresh head", None, None
    if how == "reward model" and lora:  # the RM itself: its adapters and a trained copy of its head make the critic
        critic = rm_model.to(device)
    elif critic_path:
        critic = load_model("score", critic_path, "CRITIC_MODEL", device, base_dtype, fresh_value_head=fresh)
        if lora and fresh and not sync_stop:  # FSDP shards each model on its own: there each keeps its copy
            share_frozen_base(actor, critic.model)
            notes.append("LoRA: the critic's frozen base is the actor's, held once in memory (two sets of adapters "
                         "over one backbone; the value head is the critic's own)")
    if lora and critic is not None:
        adapters["critic"] = Adapter(add_adapters(critic.model, c, "SEQ_CLS"), lambda: load_model(
            "score", critic_path, "CRITIC_MODEL", torch.device("cpu"), base_dtype, fresh_value_head=fresh).model)
        judge = AdaptersOff(rm_model, adapters["critic"].peft) if critic is rm_model else None
    if critic is not None:
        critic.model.config.pad_token_id = tok.pad_token_id
    rm = RewardScorer(judge or rm_model, rm_tok, tok, device) if rm_model is not None else None
    if rm and not rm.same_tokenizer and rm.max_len and rm.max_len < c["MAX_PROMPT_TOKENS"] + c["MAX_NEW_TOKENS"]:
        notes.append(f"the reward model reads at most {rm.max_len} of its tokens: a longer conversation keeps its "
                     f"last {rm.max_len} (a decoder) or is truncated by its tokenizer (an encoder)")
    notes += [note] if note else []
    scorer = rm or RewardFunction(c["REWARD_MODEL"], "REWARD_MODEL", device, timeout=c["SCORE_TIMEOUT"])
    if c["REWARD_FN"]:
        scorer = RewardFunction(c["REWARD_FN"], "REWARD_FN", device, scorer, c["SCORE_TIMEOUT"])
    trained = [actor] + ([critic.model] if critic is not None else [])
    if c["GRADIENT_CHECKPOINTING"]:
        for m in trained:
            m.activation_checkpointing_enable({"use_reentrant": False})
    if device.type == "cpu" and dtype == torch.bfloat16:
        for m in trained:
            attention_in_fp32(m)
    return Roles(tok, stop_token_ids(tok, actor, c["STOP_TOKENS"]), actor, ref, scorer, critic, critic_path, notes,
                 device, dtype, rm=rm, adapters=adapters, sync_stop=sync_stop)


def sdpa_fp32(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention with autocast off and q, k, v in fp32; the output back in their dtype."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)
    return out.to(query.dtype), weights


def attention_in_fp32(model):
    """Under bf16 autocast on a CPU, the trained models' attention in fp32 (sdpa_fp32): there PyTorch's bf16 SDPA
    kernel takes 2.4x the time of its fp32 one forward + backward (16.5 vs 7.0 ms at SmolLM2's [8, 9, 71, 64];
    README, "bf16 on a CPU"), while the matrix products around it run 2.3x faster in bf16. The saved config keeps
    the model's own implementation (the name is not written: transformers keeps it out of config.json)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    AttentionInterface.register("sdpa_fp32", sdpa_fp32)  # name -> function entries; registering again is harmless
    AttentionMaskInterface.register("sdpa_fp32", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])  # else: no mask at all
    inner = getattr(model, "get_base_model", lambda: model)()
    if inner.config._attn_implementation == "sdpa":
        inner.set_attn_implementation("sdpa_fp32")


def critic_source(c, tok, rm_model, rm_tok):
    """Where the Critic comes from, the first that applies; returns (path or None, how, note):
        a critic-free ADVANTAGE (grpo, rloo, reinforce++)   none: the baseline comes from other replies (3 roles)
        CRITIC_MODEL                                         that value model; it must read the actor's tokens
        a reward model with the actor's tokens, one output   a trained copy of the reward model (N+)
        otherwise                                            the actor's weights with a new zero value head (OAI)"""
    if c["ADVANTAGE"] != "gae":
        return None, None, None
    if c["CRITIC_MODEL"]:
        critic_tok, _ = load_tokenizer(c["CRITIC_MODEL"], "CRITIC_MODEL")
        if critic_tok.get_vocab() != tok.get_vocab():
            raise ConfigError(f"CRITIC_MODEL {c['CRITIC_MODEL']!r} uses a different tokenizer from the actor; the "
                              f"critic values the actor's tokens, so give a value model with the actor's tokenizer, "
                              f"or --critic_model= for the default")
        return c["CRITIC_MODEL"], "value model", None
    same_tokens = rm_model is not None and not rm_model.own_pooling and rm_tok.get_vocab() == tok.get_vocab()
    if same_tokens and rm_model.model.config.num_labels == 1:
        return c["REWARD_MODEL"], "reward model", None
    why = ("the reward is a function, not a model" if rm_model is None
           else "the reward model is an encoder classifier, read through its own tokenizer and pooling"
           if rm_model.own_pooling else "the reward model's tokenizer differs from the actor's: replies are "
           "re-tokenised for it" if not same_tokens else "the reward model has several outputs")
    return c["ACTOR_MODEL"], "fresh head", f"{why}; the critic is the actor's weights with a new zero-initialised " \
        f"value head: it predicts 0 at first (explained variance ~0, GAE then little more than whitened rewards) " \
        f"and learns at LEARNING_RATE; CRITIC_WARMUP_STEPS and CRITIC_LEARNING_RATE teach it faster"
