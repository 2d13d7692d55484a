import csv
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "code"))
sys.path.insert(0, os.path.join(ROOT, "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
SFT, RM = os.path.join(ROOT, "data/models/demo-sft"), os.path.join(ROOT, "data/models/demo-rm")

# The one small run the tests share: the demo world, short steps on the CPU. Tests override what they need.
SMALL = dict(ACTOR_MODEL=SFT, REWARD_MODEL=RM, PROMPT_FILE=os.path.join(ROOT, "data/ppo_prompts.json"),
             EVAL_FILE=os.path.join(ROOT, "data/ppo_eval.json"), GOLD_REWARD=os.path.join(ROOT, "data/demo_gold_reward.py"),
             MINI_BATCH_SIZE=4, PPO_BUFFER_SIZE=1, PPO_EPOCHS=2, MAX_NEW_TOKENS=12, EVAL_SIZE=8, EVAL_EVERY=0,
             DEVICE="cpu", SAVE_MODEL=False, THREADS=str(__import__("torch").get_num_threads()))  # no 0.2 s probe


def make_config(out=None, **overrides):
    """The small run as a config dict for ppo.train (OUTPUT_DIR = out), with overrides."""
    import ppo
    c = {k: getattr(ppo, k) for k in ppo.CONFIG_KEYS}
    c.update(SMALL, **({"OUTPUT_DIR": str(out)} if out is not None else {}))
    c.update(overrides)
    return c


def roles_of(tok, actor, ref, critic, scorer, stop_ids):
    """Roles (loading.Roles) from models a test loaded itself, on the CPU in fp32."""
    import loading
    import torch
    return loading.Roles(tok, list(stop_ids), actor, ref, scorer, critic, None, [], torch.device("cpu"), torch.float32)


def metrics_rows(out):
    """The rows of a run's ppo_metrics/training_metrics.csv."""
    return list(csv.DictReader(open(os.path.join(out, "ppo_metrics", "training_metrics.csv"))))


def assert_same_rows(a, b):
    """Two runs' CSV rows agree in every column but the wall-clock and memory ones (exact resume, repeatable seeds)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in x:
            if not k.startswith(("time/", "mem/")):
                assert float(x[k]) == pytest.approx(float(y[k]), abs=1e-6, nan_ok=True), (x["step"], k, x[k], y[k])


def torchrun(args, out):
    """code/ppo.py under torchrun, 2 processes on the CPU (gloo), a short run into `out`; later args override."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "code/ppo.py"), "--total_steps=2", "--mini_batch_size=2", "--grad_accum=2",
           "--ppo_buffer_size=1", "--ppo_epochs=2", "--max_new_tokens=12", "--eval_size=8", "--device=cpu",
           f"--output_dir={out}"] + args
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)


def make_args(**overrides):
    """The small run as --name=value arguments for code/ppo.py, with overrides."""
    return [f"--{k.lower()}={v}" for k, v in dict(SMALL, **overrides).items()]

# chat templates in the shapes the families' repositories ship (shortened; the turn-ending tokens are the point)
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                    "{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}")
GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>"
                  "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
                  "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
# family -> (special tokens, tokenizer special-token roles, chat template, generation_config EOS tokens)
FAMILIES = {
    # Llama-3-Instruct: no pad token; turns end with <|eot_id|>, which generation_config lists beside the EOS
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"), LLAMA3_TEMPLATE,
               ["<|end_of_text|>", "<|eot_id|>"]),
    # Mistral-Instruct as often re-saved: pad == EOS
    "mistral": (["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
                dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"), MISTRAL_TEMPLATE, None),
    # Gemma 3 4B+: a ...ForConditionalGeneration checkpoint; turns end with <end_of_turn>
    "gemma3": (["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                "<end_of_image>", "<image_soft_token>"],
               dict(pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"), GEMMA_TEMPLATE,
               ["<eos>", "<end_of_turn>"]),
    # OPT: a base model (no chat template) with learned positions, here only 64 of them
    "opt": (["<pad>", "</s>", "<unk>"], dict(pad_token="<pad>", bos_token="</s>", eos_token="</s>", unk_token="<unk>"),
            None, None),
}


def demo_texts():
    rows = json.load(open(os.path.join(ROOT, "data/ppo_prompts.json")))
    return [r["instruction"] + " " + (r.get("input") or "") + " " + r["output"] for r in rows]


def bpe_tokenizer(specials, roles, template):
    """A byte-level BPE tokenizer trained on the demo prompts, with the family's special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train_from_iterator(demo_texts(), trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                             show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, model_input_names=["input_ids", "attention_mask"], **roles)
    tok.chat_template = template
    return tok


def build_causal(folder, family):
    """A tiny random causal LM of `family` with its tokenizer quirks, saved as a user would bring it."""
    import torch
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, LlamaConfig, LlamaForCausalLM,
                              MistralConfig, MistralForCausalLM, OPTConfig, OPTForCausalLM)
    specials, roles, template, stops = FAMILIES[family]
    tok = bpe_tokenizer(specials, roles, template)
    ids = dict(vocab_size=len(tok), eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
               pad_token_id=tok.pad_token_id)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    torch.manual_seed(0)
    if family == "llama3":
        model = LlamaForCausalLM(LlamaConfig(**ids, **small, num_key_value_heads=1, max_position_embeddings=256))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**ids, **small, num_key_value_heads=1, max_position_embeddings=256))
    elif family == "opt":
        model = OPTForCausalLM(OPTConfig(**ids, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                                         word_embed_proj_dim=32, max_position_embeddings=64))
    else:
        image = tok.convert_tokens_to_ids
        model = Gemma3ForConditionalGeneration(Gemma3Config(
            text_config=dict(**ids, **small, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                             sliding_window=16, layer_types=["sliding_attention", "full_attention"]),
            vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               image_size=28, patch_size=14),
            mm_tokens_per_image=4, image_token_index=image("<image_soft_token>"),
            boi_token_index=image("<start_of_image>"), eoi_token_index=image("<end_of_image>")))
    if stops:
        model.generation_config.eos_token_id = [tok.convert_tokens_to_ids(t) for t in stops]
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def build_encoder_rm(folder):
    """A tiny DistilBERT sentiment classifier (NEGATIVE / POSITIVE) with a WordPiece tokenizer of its own."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import DistilBertConfig, DistilBertForSequenceClassification, PreTrainedTokenizerFast
    tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.normalizer, tk.pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tk.train_from_iterator(demo_texts(), trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials,
                                                                   show_progress=False))
    cls, sep = tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                      special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(0)
    model = DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=len(tok), dim=32, hidden_dim=64, n_layers=1, n_heads=2, max_position_embeddings=128,
        pad_token_id=tok.pad_token_id, num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1}))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(name) -> folder of a tiny random checkpoint in a shape users bring (built once a session):
    "llama3", "mistral", "gemma3", "opt" (causal LMs, see FAMILIES) or "distilbert-rm" (an encoder classifier)."""
    built = {}

    def get(name):
        if name not in built:
            folder = tmp_path_factory.mktemp(name)
            built[name] = build_encoder_rm(folder) if name == "distilbert-rm" else build_causal(folder, name)
        return built[name]
    return get
