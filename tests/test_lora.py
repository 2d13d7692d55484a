"""LoRA (LORA_R > 0, through peft): only adapters and the value head train, the frozen roles share the trained
models' weights with the adapters off, the saved adapters and merged models agree, and resume stays exact."""
import os
import sys

import pytest
import torch

import loading
import ppo

from conftest import RM, ROOT, SFT, assert_same_rows, make_config, metrics_rows as rows, torchrun

pytest.importorskip("peft", reason="the test command installs peft")  # CI installs it: this never skips there
CPU = torch.device("cpu")
LORA = dict(LORA_R=8, LORA_ALPHA=16, LEARNING_RATE=3e-3)  # a large rate, so that 2 steps move the adapters visibly


def base_weights(model):
    """The frozen base weights of a LoRA model under the plain model's names (peft inserts .base_layer)."""
    return {n.replace(".base_layer", "").replace(".original_module", ""): p.detach().clone()
            for n, p in model.named_parameters() if not p.requires_grad}


def test_adapters_train_alone_over_a_frozen_base_shared_by_the_frozen_roles(tmp_path):
    c = make_config(tmp_path, TOTAL_STEPS=2, EVAL_FILE="", **LORA)
    roles = loading.load_roles(c, CPU, torch.float32)
    params = loading.trainable_parameters([roles.actor, roles.critic])  # what train() gives the optimizer
    trainer = ppo.Trainer(roles.actor, roles.critic, params, torch.optim.AdamW(params, lr=c["LEARNING_RATE"]), None)
    prompts, _ = loading.load_prompt_files(c, ppo.DEFAULTS, roles, ppo.batch_sizes(c, 1), lambda *a: None)
    # four roles, two models: the reference is the actor with its adapters off, the reward model the critic
    assert isinstance(roles.ref, loading.AdaptersOff) and roles.ref.module is roles.actor
    assert isinstance(roles.rm.model, loading.AdaptersOff) and roles.rm.model.module is roles.critic
    # only adapters and the (copied) value head are in the optimizer
    named = {id(p): n for m in (roles.actor, roles.critic) for n, p in m.named_parameters()}
    trained = [named[id(p)] for g in trainer.optimizer.param_groups for p in g["params"]]
    assert trained and all("lora_" in n or "modules_to_save" in n for n in trained)
    assert any("score.modules_to_save" in n for n in trained)
    assert all(p.dtype == torch.float32 for p in params)
    before = {"actor": base_weights(roles.actor), "critic": base_weights(roles.critic.model)}
    with torch.no_grad():
        plain_rm = loading.load_model("reward", RM, "R", CPU, torch.float32)
        plain_sft = loading.load_model("causal", SFT, "S", CPU, torch.float32)
    for step in (1, 2):
        row, batch = ppo.ppo_step(roles, trainer, prompts[4 * step:4 * step + 4], 0.1, c, ppo.batch_sizes(c, 1))
        if step == 1:  # adapters start as the identity: the policy is the reference (up to float rounding)
            assert abs(row["objective/kl"]) < 1e-4
    # the frozen base is unchanged bit for bit, and equal to the checkpoints on disk
    for name, plain in (("actor", plain_sft), ("critic", plain_rm.model)):
        after = base_weights(roles.actor if name == "actor" else roles.critic.model)
        assert after.keys() == before[name].keys()
        assert all(torch.equal(after[k], before[name][k]) for k in after)
        disk = dict(plain.named_parameters())
        assert all(torch.equal(after[k], disk[k]) for k in after if k in disk) and len(set(after) & set(disk)) > 10
    lora_b = [p for n, p in roles.actor.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # the adapters did train
    # the reward model and the reference are still exactly the SFT/RM checkpoints
    ids, am, ctx = batch["query_responses"], batch["attention_mask"], batch["context_length"]
    idx = loading.last_index(am)
    assert torch.equal(loading.frozen_forward(roles.rm.model, loading.call, ids, am, idx),
                       loading.frozen_forward(plain_rm, loading.call, ids, am, idx))
    ref_lp = loading.frozen_forward(roles.ref, ppo.response_logprobs, ids, am, ctx, 1.0)
    assert torch.allclose(ref_lp, loading.frozen_forward(plain_sft, ppo.response_logprobs, ids, am, ctx, 1.0), atol=1e-6)
    actor_lp = loading.frozen_forward(roles.actor, ppo.response_logprobs, ids, am, ctx, 1.0)
    assert not torch.allclose(actor_lp, ref_lp, atol=1e-4)  # with the adapters on, the trained policy


def test_saved_adapters_and_merged_models_agree_and_checkpoints_hold_what_trains(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    s = ppo.train(make_config(tmp_path, TOTAL_STEPS=2, EVAL_SIZE=4, SAVE_MODEL=True, **LORA))
    assert s["models"]["lora"]["shared"] == ["reference = actor with its adapters off",
                                             "reward = critic with its adapters off"]
    assert s["models"]["trained_params"] < s["models"]["actor_params"] / 4
    model_dir = tmp_path / "ppo_model"
    assert sorted(os.listdir(model_dir)) == ["actor", "actor_adapter", "critic", "critic_adapter"]
    ids = torch.tensor([[5, 17, 40, 41, 9, 88, 3, 1], [0, 0, 5, 30, 31, 12, 7, 2]])
    am = (torch.arange(8) >= torch.tensor([[0], [2]])).long()
    merged = AutoModelForCausalLM.from_pretrained(model_dir / "actor")  # a plain transformers model
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(SFT), model_dir / "actor_adapter")
    sft = AutoModelForCausalLM.from_pretrained(SFT)
    with torch.no_grad():
        a, b, c = (m(input_ids=ids, attention_mask=am).logits for m in (merged, adapted, sft))
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, c, atol=1e-3)
    merged_critic = AutoModelForSequenceClassification.from_pretrained(model_dir / "critic")
    adapted_critic = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(RM),
                                               model_dir / "critic_adapter")
    with torch.no_grad():
        assert torch.allclose(merged_critic(input_ids=ids, attention_mask=am).logits,
                              adapted_critic(input_ids=ids, attention_mask=am).logits, atol=1e-5)
    # the checkpoint holds adapters, value head and optimizer, not the frozen base
    state = torch.load(tmp_path / "checkpoints/step_00000002/state.pt", weights_only=False)
    assert state["models"] and all("lora_" in k or "modules_to_save" in k for k in state["models"])


def test_lora_resume_is_exact_and_works_with_bf16_and_gradient_checkpointing(tmp_path):
    ppo.train(make_config(tmp_path / "a", TOTAL_STEPS=4, EVAL_FILE="", **LORA))
    ppo.train(make_config(tmp_path / "b", TOTAL_STEPS=2, EVAL_FILE="", **LORA))
    ppo.train(make_config(tmp_path / "b", TOTAL_STEPS=4, EVAL_FILE="", **LORA))
    a, b = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert len(a) == len(b) == 4
    assert_same_rows(a, b)
    # bf16: the frozen base is stored in bf16, the adapters stay fp32 master weights
    c = make_config(tmp_path / "bf16", TOTAL_STEPS=2, EVAL_FILE="", GOLD_REWARD="", MAX_NEW_TOKENS=8,
                    DTYPE="bfloat16", GRADIENT_CHECKPOINTING=True, **LORA)
    assert ppo.train(c)["steps"] == 2
    roles = loading.load_roles(c, CPU, torch.bfloat16)
    frozen = [p for p in roles.actor.parameters() if not p.requires_grad]
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(p.dtype == torch.float32 for p in roles.actor.parameters() if p.requires_grad)
    assert roles.actor.is_activation_checkpointing


def test_explicit_reference_and_critic_paths_load_separately(tmp_path):
    c = make_config(tmp_path, TOTAL_STEPS=1, EVAL_FILE="", REF_MODEL=SFT + "/", CRITIC_MODEL=RM + "/", **LORA)
    roles = loading.load_roles(c, CPU, torch.float32)
    assert not isinstance(roles.ref, loading.AdaptersOff) and not isinstance(roles.rm.model, loading.AdaptersOff)
    assert roles.critic is not roles.rm.model and set(roles.adapters) == {"actor", "critic"}


def test_lora_mistakes_are_one_clear_line(tmp_path, monkeypatch):
    with pytest.raises(loading.ConfigError, match="LORA_TARGET_MODULES 'nope'"):
        loading.load_roles(make_config(tmp_path, LORA_R=4, LORA_TARGET_MODULES="nope"), CPU, torch.float32)
    with pytest.raises(loading.ConfigError, match="LORA_R = -1"):
        ppo.train(make_config(tmp_path, LORA_R=-1))
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    with pytest.raises(loading.ConfigError, match="pip install peft"):
        loading.load_roles(make_config(tmp_path, LORA_R=4), CPU, torch.float32)


@pytest.mark.parametrize("mode,reward", [("ddp", RM), ("fsdp", RM), ("ddp", "data/demo_gold_reward.py")],
                         ids=["ddp", "fsdp", "ddp-critic-of-the-actor"])  # the last: critic and actor share a base
def test_torchrun_with_lora(mode, reward, tmp_path):
    r = torchrun(["--eval_size=4", "--lora_r=8", "--learning_rate=3e-3", f"--distributed={mode}",
                  f"--reward_model={reward}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (reward == RM) != ("critic's frozen base is the actor's" in r.stdout)
    out = rows(tmp_path)
    assert len(out) == 2 and all(float(x["dist/ranks_in_sync"]) == 1.0 for x in out)
    assert abs(float(out[0]["objective/kl"])) < 1e-4
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "ppo_model/actor")
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(SFT), tmp_path / "ppo_model/actor_adapter")
    ids = torch.tensor([[5, 17, 40, 41, 9, 88, 3, 1]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-5)


def test_a_critic_made_of_the_actor_shares_its_frozen_base_and_trains_and_saves_the_same(tmp_path, monkeypatch):
    """A reward function: the critic is the actor's checkpoint with a fresh value head. Under LoRA its frozen base is
    the actor's tensors (one copy in memory), and the run, the saved merged models included, is what two copies give."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    c = dict(TOTAL_STEPS=2, EVAL_FILE="", SAVE_MODEL=True, REWARD_MODEL=os.path.join(ROOT, "data/demo_gold_reward.py"),
             **LORA)
    roles = loading.load_roles(make_config(tmp_path / "x", **c), CPU, torch.float32)
    actor_ptrs = {p.data_ptr() for p in roles.actor.parameters() if not p.requires_grad}
    backbone = getattr(roles.critic.model, roles.critic.model.base_model_prefix)
    critic_frozen = [p for p in backbone.parameters() if not p.requires_grad]
    assert critic_frozen and all(p.data_ptr() in actor_ptrs for p in critic_frozen)
    assert any("critic's frozen base is the actor's" in n for n in roles.notes)
    ppo.train(make_config(tmp_path / "shared", **c))
    monkeypatch.setattr(loading, "share_frozen_base", lambda actor, critic: None)  # two copies, as before
    ppo.train(make_config(tmp_path / "copies", **c))
    assert_same_rows(rows(tmp_path / "shared"), rows(tmp_path / "copies"))
    for kind, auto in (("actor", AutoModelForCausalLM), ("critic", AutoModelForSequenceClassification)):
        a, b = (dict(auto.from_pretrained(tmp_path / run / "ppo_model" / kind).named_parameters())
                for run in ("shared", "copies"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), kind
    sft = dict(AutoModelForCausalLM.from_pretrained(SFT).named_parameters())
    merged = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "shared/ppo_model/actor").named_parameters())
    assert any(not torch.equal(merged[k], sft[k]) for k in sft)  # the adapters were merged into the actor
