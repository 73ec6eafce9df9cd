"""Many users in one job (prefixtune.users): isolation to the bit, equivalence with a lone `train` run,
gradients that reach only their own user, a frozen base model, 1,000 users, and a store the server starts on."""
from __future__ import annotations

import json
import random
import re
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_model
from prefixtune.train import train
from prefixtune.train_config import TrainConfig
from prefixtune.users import UsersConfig, store_dir, train_users
from prefixtune.users.names import prefix_name, prefix_names

WORDS = "name area food price pub cheap Thai riverside centre coffee shop family friendly yes no the a is".split()


def user_data(users: int, examples: int, seed: int = 0, dev: int = 2):
    """Each user's own (source, target) pairs: random words of random lengths, so rows pad differently."""
    rng = random.Random(seed)
    phrase = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
    train_pairs, dev_pairs = {}, {}
    for u in range(users):
        pairs = [(f"user {u} : " + phrase(2, 12), phrase(1, 10)) for _ in range(examples + dev)]
        train_pairs[f"user{u}"], dev_pairs[f"user{u}"] = pairs[:examples], pairs[examples:]
    return train_pairs, dev_pairs


def config(tmp_path, name, **overrides):
    options = dict(output_dir=str(tmp_path / name), method="prefix", mlp_dim=16, batch_size=3, max_steps=6,
                   eval_every=2, early_stop_patience=1, lr=5e-3,
                   max_source_len=128, max_target_len=64)  # within the tiny GPT-2's 256 positions, with the prefix
    return TrainConfig(**{**options, **overrides})


def exported(result, user) -> dict:
    return load_file(store_dir(result.output_dir, result.tenant) / f"{prefix_name(user)}.safetensors")


def same_bytes(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.mark.parametrize("method, precision", [("prefix", "auto"), ("prefix-flat", "fp32")])
def test_changing_one_users_data_leaves_every_other_users_prefix_bit_identical(llama, tokenizer, tmp_path,
                                                                               method, precision):
    train_pairs, dev_pairs = user_data(6, 7)
    first = train_users(config(tmp_path, "a", method=method, precision=precision), llama, tokenizer,
                        train_pairs, dev_pairs, progress=False)
    changed = dict(train_pairs)  # user2: other texts, other lengths, another number of examples and steps
    changed["user2"] = [(s + " and much more text here", t.upper() + " longer") for s, t in train_pairs["user2"]][:4]
    # ... and other rounds: 2 users resident at a time instead of all 6, so every batch mixes other users
    second = train_users(config(tmp_path, "b", method=method, precision=precision), llama, tokenizer,
                         changed, dev_pairs, users=UsersConfig(resident_users=2), progress=False)
    assert not same_bytes(exported(first, "user2"), exported(second, "user2"))
    for user in train_pairs:
        if user != "user2":
            assert same_bytes(exported(first, user), exported(second, user)), user
    rows = {r["user"]: r for r in first.users}
    assert {r["user"]: r for r in second.users}["user0"] == rows["user0"]
    # and alone: a job of one user gives that user's prefix to the bit
    alone = train_users(config(tmp_path, "c", method=method, precision=precision), llama, tokenizer,
                        {"user4": train_pairs["user4"]}, dev_pairs, progress=False)
    assert same_bytes(exported(first, "user4"), exported(alone, "user4"))


def row_variant_linears(model):
    """Forward hooks that make every nn.Linear of `model` add 1e-3 x the rows of its call to its output: a kernel
    whose result for a row depends on how many rows the call holds (as this CPU's bf16 AMX matmuls do, by
    rounding). Returns the hooks' handles."""
    def hook(module, inputs, output):
        rows = 1
        for n in inputs[0].shape[:-1]:
            rows *= n
        return output + 1e-3 * rows

    return [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]


def test_one_user_per_pass_keeps_users_apart_even_on_kernels_that_depend_on_the_row_count(llama, tokenizer,
                                                                                          tmp_path):
    """By default a forward pass holds one user's rows only: on a kernel whose rows' results depend on the rows of
    the call, another user's data changing still changes no bit of a user's prefix. With `share_passes` (users
    packed into passes) it does: the control, which shows the kernel is row-variant enough to matter."""
    train_pairs, dev_pairs = user_data(2, 6, seed=3)
    changed = {**train_pairs, "user1": train_pairs["user1"] * 2}  # user1: twice the rows, in every pass they share
    handles = row_variant_linears(llama)
    try:
        def user0(name, pairs, **options):
            result = train_users(config(tmp_path, name, precision="fp32"), llama, tokenizer, pairs, dev_pairs,
                                 users=UsersConfig(**options), progress=False)
            return exported(result, "user0")

        assert same_bytes(user0("apart", train_pairs), user0("apart-changed", changed))
        assert not same_bytes(user0("shared", train_pairs, share_passes=True),
                              user0("shared-changed", changed, share_passes=True))
    finally:
        for handle in handles:
            handle.remove()


def test_a_pass_holds_one_user_unless_passes_are_shared():
    from prefixtune.users.step import plan

    row = lambda n: {"input_ids": [1] * n, "labels": [1] * n}
    batches = {0: [row(5), row(20), row(3)], 1: [row(7), row(30)], 2: [row(40)]}
    apart = plan(batches, "decoder", 16, 4096)
    assert [(key, [u for u, _ in groups]) for key, groups in apart] == [
        ((16,), [0]), ((16,), [1]), ((32,), [0]), ((32,), [1]), ((48,), [2])]
    assert [len(rows) for _, groups in apart for _, rows in groups] == [2, 1, 1, 1, 1]
    shared = plan(batches, "decoder", 16, 4096, share_passes=True)
    assert [(key, [u for u, _ in groups]) for key, groups in shared] == [((16,), [0, 1]), ((32,), [0, 1]), ((48,), [2])]
    # a user's rows alone may exceed max_tokens, as before
    assert [(key, [u for u, _ in g]) for key, g in plan(batches, "decoder", 16, 16)][0] == ((16,), [0])


# A user trained in the joint job against `train.train` on that user's data alone, same seed and batches, in
# fp32. The one difference is the padding: train pads a batch to its longest row, the joint job pads each row to
# a multiple of 16, which changes the order of some sums in the backward pass (measured: 1e-7 relative on
# a gradient). Measured here: 1.0-1.4e-7 of the largest |P| after these steps, fp32; 1e-5 bounds it (bf16: below).
EQUIVALENCE_TOL = 1e-5


@pytest.mark.parametrize("method, dropout", [("prefix", 0.0), ("prefix-flat", 0.0), ("prefix", 0.3)])
def test_a_user_trained_jointly_equals_that_user_trained_alone_by_train(llama, tokenizer, tmp_path, method, dropout):
    train_pairs, dev_pairs = user_data(4, 8, seed=1)
    options = dict(method=method, precision="fp32", prefix_dropout=dropout, weight_decay=0.01, warmup_steps=2,
                   early_stop_patience=0)
    joint = train_users(config(tmp_path, "joint", **options), llama, tokenizer, train_pairs, dev_pairs,
                        progress=False)
    rows = {r["user"]: r for r in joint.users}
    for user in ("user1", "user3"):
        alone = train(config(tmp_path, f"alone-{user}", **options), llama, tokenizer, train_pairs[user],
                      dev_pairs[user], progress=False)
        ours, theirs = exported(joint, user), load_file(alone.prefix_file)
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert (ours[key] - theirs[key]).abs().max() <= EQUIVALENCE_TOL * theirs[key].abs().max(), (user, key)
        assert rows[user]["steps"] == alone.steps and rows[user]["best_step"] == alone.best_step
        assert rows[user]["best_dev_loss"] == pytest.approx(alone.best_dev_loss, rel=1e-5)
    # the prefixes moved: the tolerance is far below what training changed
    other = exported(joint, "user1")["prefix.decoder"] - exported(joint, "user3")["prefix.decoder"]
    assert other.abs().max() > 100 * EQUIVALENCE_TOL * exported(joint, "user1")["prefix.decoder"].abs().max()


def test_in_bf16_too_a_user_trained_jointly_equals_that_user_trained_alone(llama, tokenizer, tmp_path):
    # the joint job computed P through the MLP under bf16 autocast where train keeps P in float32: the prefixes
    # differed by 0.3-0.7% of the largest |P| (measured 6.5e-3 and 2.6e-3); computed alike, 6.5e-8
    from prefixtune.precision import bf16_available

    if not bf16_available(torch.device("cpu")):
        pytest.skip("this CPU has no bf16")
    train_pairs, dev_pairs = user_data(4, 8, seed=1)
    options = dict(method="prefix", precision="bf16", weight_decay=0.01, warmup_steps=2, early_stop_patience=0)
    joint = train_users(config(tmp_path, "joint", **options), llama, tokenizer, train_pairs, dev_pairs,
                        progress=False)
    row = {r["user"]: r for r in joint.users}["user1"]
    alone = train(config(tmp_path, "alone", **options), llama, tokenizer, train_pairs["user1"], dev_pairs["user1"],
                  progress=False)
    ours, theirs = exported(joint, "user1"), load_file(alone.prefix_file)
    for key in ours:
        assert (ours[key] - theirs[key]).abs().max() <= EQUIVALENCE_TOL * theirs[key].abs().max(), key
    assert row["best_dev_loss"] == pytest.approx(alone.best_dev_loss, rel=1e-5)


def test_a_users_gradients_come_from_their_own_rows_only(llama, tokenizer):
    """A backward pass over a batch of three users' rows: each user's gradient is the one their rows alone
    give, a user without rows gets none, and another user's rows changing changes nothing."""
    from prefixtune.data.collate import Collator, encode_pair
    from prefixtune.models import model_spec
    from prefixtune.users.step import plan, run_passes, target_count

    spec = model_spec(llama)
    train_pairs, _ = user_data(3, 4, seed=2)
    encoded = {u: [encode_pair(tokenizer, "decoder", s, t) for s, t in train_pairs[f"user{u}"]] for u in range(3)}
    collate = Collator(tokenizer.pad_token_id, "decoder")
    torch.manual_seed(0)
    base = {u: {"decoder": torch.randn(10, 64)} for u in range(4)}

    def grads(batches):
        leaves = {u: {"decoder": p["decoder"].clone().requires_grad_()} for u, p in base.items()}
        norms = {u: sum(target_count(e, "decoder") for e in rows) for u, rows in batches.items()}
        run_passes(llama, spec, plan(batches, "decoder", 16, 4096), leaves, collate, torch.device("cpu"), False, norms)
        return {u: leaf["decoder"].grad for u, leaf in leaves.items()}

    mixed = grads(encoded)
    assert mixed[3] is None                               # user 3 has no rows: no gradient at all
    assert all(mixed[u].abs().sum() > 0 for u in range(3))
    for u in range(3):
        assert torch.equal(mixed[u], grads({u: encoded[u]})[u])
    other = dict(encoded)
    other[1] = [encode_pair(tokenizer, "decoder", s + " changed", "another target") for s, _ in train_pairs["user1"]]
    changed = grads(other)
    assert torch.equal(changed[0], mixed[0]) and torch.equal(changed[2], mixed[2])
    assert not torch.equal(changed[1], mixed[1])


def test_the_frozen_model_never_changes(llama, tokenizer, tmp_path):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    train_pairs, dev_pairs = user_data(3, 4)
    train_users(config(tmp_path, "frozen", weight_decay=0.1), llama, tokenizer, train_pairs, dev_pairs,
                progress=False)
    after = llama.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad or p.grad is not None for p in llama.parameters())


def test_an_exported_users_state_is_freed_before_the_next_user_starts(llama, tokenizer, tmp_path, monkeypatch):
    """One resident user at a time means one: nothing keeps an exported user's module and AdamW (the budget
    counts them no more). Without the collector: a reference cycle would hide a leak from the test."""
    import gc
    import weakref

    from prefixtune.users.state import UserState

    create, states, alive_at_start = UserState.create.__func__, [], []

    def tracked(cls, *args, **kwargs):
        alive_at_start.append(sum(ref() is not None for ref in states))
        state = create(cls, *args, **kwargs)
        states.append(weakref.ref(state))
        return state

    monkeypatch.setattr(UserState, "create", classmethod(tracked))
    train_pairs, dev_pairs = user_data(3, 4)
    gc.disable()
    try:
        train_users(config(tmp_path, "one"), llama, tokenizer, train_pairs, dev_pairs,
                    UsersConfig(resident_users=1), progress=False)
    finally:
        gc.enable()
    assert alive_at_start == [0, 0, 0] and all(ref() is None for ref in states)


def test_a_thousand_users_in_one_job(llama, tokenizer, tmp_path):
    from prefixtune.bank import PrefixBank
    from prefixtune.serve import PrefixStore, ServeSettings

    train_pairs, dev_pairs = user_data(1000, 3, dev=1)
    result = train_users(config(tmp_path, "many", method="prefix-flat", max_steps=2, eval_every=0,
                                early_stop_patience=0), llama,
                         tokenizer, train_pairs, dev_pairs, progress=False)
    assert len(result.users) == 1000 and result.resident_users == 1000
    assert all(r["steps"] == 2 and r["best_step"] == 2 and r["best_dev_loss"] > 0 for r in result.users)
    # memory per user, measured: P (10 x 64 floats), AdamW's two moments and step, the best state
    assert result.state_bytes_per_user == 4 * 640 * 4 + 4
    store = PrefixStore(PrefixBank(llama, tokenizer), ServeSettings(store_dir=result.store), [result.tenant])
    assert store.count() == 1000 and store.get(result.tenant, "user999").prefix_len == 10
    summary = json.loads((tmp_path / "many" / "users.json").read_text())
    assert len(summary["users"]) == 1000
    csv_lines = (tmp_path / "many" / "users.csv").read_text().splitlines()
    assert len(csv_lines) == 1001 and csv_lines[0].startswith("user,prefix,examples,dev_examples,steps,best_step")


def test_user_names_become_prefix_names_or_are_refused():
    assert prefix_name("alice") == "alice" and prefix_name(7) == "7"
    assert prefix_name("alice@example.com") == "alice-example.com"
    assert prefix_name("Jörg Müller") == "J-rg-M-ller"
    with pytest.raises(ValueError, match="'a b' and 'a-b' would both be named 'a-b'"):
        prefix_names(["a b", "a-b"])
    with pytest.raises(ValueError, match="'Ann' and 'ann' would be named 'Ann' and 'ann', which differ only in case"):
        prefix_names(["Ann", "ann"])  # one file on macOS or Windows: one user's prefix served as the other's
    with pytest.raises(ValueError, match="'Bo B' and 'bo-b' would be named 'Bo-B' and 'bo-b'"):
        prefix_names(["Bo B", "bo-b"])
    with pytest.raises(ValueError, match="no usable prefix name"):
        prefix_names(["ok", "@@@"])
    with pytest.raises(ValueError, match="base model's name"):
        prefix_names(["smollm2-135m"], reserved=("smollm2-135m",))


def test_bad_jobs_are_refused_before_the_model_loads(tmp_path):
    bad = TrainConfig(output_dir=str(tmp_path / "x"), model="no-such-model", method="prefix")
    with pytest.raises(ValueError, match="would both be named"):
        train_users(bad, train={"a b": [("x", "y")], "a_b": [("x", "y")], "a-b": [("x", "y")]})
    with pytest.raises(ValueError, match="user 'b' has no training examples"):
        train_users(bad, train={"a": [("x", "y")], "b": []})
    with pytest.raises(ValueError, match="--method must be one of prefix, prefix-flat"):
        train_users(TrainConfig(output_dir=str(tmp_path / "x"), method="adapter"), train={"a": [("x", "y")]})
    assert not (tmp_path / "x").exists()


def test_a_killed_job_resumes_with_the_users_it_had_not_written(llama, tokenizer, tmp_path):
    train_pairs, dev_pairs = user_data(4, 5)
    cfg = config(tmp_path, "run")
    whole = train_users(cfg, llama, tokenizer, train_pairs, dev_pairs, progress=False)
    prefixes = store_dir(cfg.output_dir, "default")
    before = {u: exported(whole, u) for u in train_pairs}
    for user in ("user1", "user3"):  # a job killed while these two were training: their files were never written
        (prefixes / f"{user}.safetensors").unlink()
    (tmp_path / "run" / "users.json").unlink()
    kept = (prefixes / "user0.safetensors").stat().st_mtime_ns
    changed = {**train_pairs, "user2": train_pairs["user2"][:3]}  # and user2's rows changed meanwhile
    resumed = train_users(cfg, llama, tokenizer, changed, dev_pairs, progress=False, resume=True)
    assert (prefixes / "user0.safetensors").stat().st_mtime_ns == kept          # kept, not trained again
    assert all(same_bytes(before[u], exported(resumed, u)) for u in ("user0", "user1", "user3"))
    assert not same_bytes(before["user2"], exported(resumed, "user2"))          # trained again on its new rows
    rows = {r["user"]: r for r in resumed.users}
    assert rows["user0"] == {r["user"]: r for r in whole.users}["user0"] and rows["user2"]["examples"] == 3
    assert len(json.loads((tmp_path / "run" / "users.json").read_text())["users"]) == 4
    # the job moved to another folder (or another machine) and killed again: its users are still its own
    (tmp_path / "run").rename(tmp_path / "moved")
    moved = store_dir(tmp_path / "moved", "default")
    (moved / "user1.safetensors").unlink()
    kept = (moved / "user0.safetensors").stat().st_mtime_ns
    again = train_users(config(tmp_path, "moved"), llama, tokenizer, changed, dev_pairs, progress=False, resume=True)
    assert (moved / "user0.safetensors").stat().st_mtime_ns == kept
    assert same_bytes(before["user1"], exported(again, "user1"))


def test_a_resumed_job_keeps_its_saved_job_options_but_those_the_caller_set(llama, tokenizer, tmp_path):
    """The saved UsersConfig, with what the caller set (the CLI's --tenant, a memory budget): a caller that names
    its tenant does not put the job back to the default padding (which changes the users' prefixes' bits)."""
    train_pairs, dev_pairs = user_data(2, 3)
    cfg = config(tmp_path, "run", max_steps=1)
    train_users(cfg, llama, tokenizer, train_pairs, dev_pairs, users=UsersConfig(tenant="acme", pad_to=8),
                progress=False)
    (tmp_path / "run" / "users.json").unlink()
    train_users(cfg, llama, tokenizer, train_pairs, dev_pairs, users=UsersConfig(tenant="acme", resident_users=1),
                progress=False, resume=True)
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())["users"]
    assert (saved["tenant"], saved["pad_to"], saved["resident_users"]) == ("acme", 8, 1)
    assert saved["share_passes"] is False


def test_share_passes_is_saved_and_resumed_and_an_older_job_without_it_resumes(llama, tokenizer, tmp_path):
    from prefixtune.users import resumed_users_config

    train_pairs, dev_pairs = user_data(2, 3)
    cfg = config(tmp_path, "run", max_steps=1)
    train_users(cfg, llama, tokenizer, train_pairs, dev_pairs, users=UsersConfig(share_passes=True), progress=False)
    (tmp_path / "run" / "users.json").unlink()
    train_users(cfg, llama, tokenizer, train_pairs, dev_pairs, users=UsersConfig(resident_users=1), progress=False,
                resume=True)
    path = tmp_path / "run" / "train_config.json"
    saved = json.loads(path.read_text())
    assert (saved["users"]["share_passes"], saved["users"]["resident_users"]) == (True, 1)
    del saved["users"]["share_passes"]  # a job saved before the option: one user per pass, the default
    path.write_text(json.dumps(saved))
    _, users = resumed_users_config(tmp_path / "run", {}, None)
    assert users.share_passes is False and users.resident_users == 1


def test_a_finished_job_is_not_replaced_silently(llama, tokenizer, tmp_path):
    train_pairs, dev_pairs = user_data(2, 3)
    cfg = config(tmp_path, "run", max_steps=1)
    train_users(cfg, llama, tokenizer, train_pairs, dev_pairs, progress=False)
    with pytest.raises(FileExistsError, match="holds a many-users run"):
        train_users(cfg, llama, tokenizer, train_pairs, dev_pairs, progress=False)
    result = train_users(cfg, llama, tokenizer, {"user0": train_pairs["user0"]}, dev_pairs, progress=False,
                         overwrite=True)
    assert [p.name for p in store_dir(result.output_dir, "default").iterdir()] == ["user0.safetensors"]


REPLACE = "pass --overwrite to replace it"
NOT_A_JOB = f"holds a single-prefix run (train without --user-field): {REPLACE}, or"
# What OUT_DIR holds -> what starting a single run, a many-users job, and a many-users job with --resume refuse
# (None: started there). With --overwrite each replaces what is there; a single run's --resume is checked in train.py.
WHAT_A_RUN_REFUSES = {
    "nothing": (None, None, None),
    "an empty folder": (None, None, None),
    "a finished run": (f"holds a finished run: {REPLACE}, or", NOT_A_JOB, NOT_A_JOB),
    "an interrupted run": (f"holds an interrupted run: {REPLACE}, --resume to continue it, or", NOT_A_JOB, NOT_A_JOB),
    "a many-users summary": (f"holds a many-users run (--user-field): {REPLACE}, or",
                             f"holds a many-users run: {REPLACE}, --resume to finish it, or", None),
    "a many-users prefix": (f"holds a many-users run (--user-field): {REPLACE}, or",
                            f"holds a many-users run: {REPLACE}, --resume to finish it, or", None),
}


def occupy(out, holds: str):
    files = {"a finished run": "result.json", "an interrupted run": "checkpoint.pt", "a many-users summary":
             "users.json", "a many-users prefix": "store/tenant/user.safetensors"}
    if holds != "nothing":
        out.mkdir()
    if holds in files:
        (out / files[holds]).parent.mkdir(parents=True, exist_ok=True)
        (out / files[holds]).write_text("{}")


@pytest.mark.parametrize("holds", WHAT_A_RUN_REFUSES)
def test_a_run_never_takes_a_directory_it_does_not_own_without_overwrite(tmp_path, holds):
    """run_dir.check_output_dir, for a single run and a many-users job alike (users/trainer.py restated it)."""
    from prefixtune.run_dir import check_output_dir

    out = tmp_path / "out"
    occupy(out, holds)
    before = sorted(tmp_path.rglob("*"))
    occupied = holds not in ("nothing", "an empty folder")
    for (users, resume), refusal in zip(((False, False), (True, False), (True, True)), WHAT_A_RUN_REFUSES[holds]):
        if refusal is None:
            assert check_output_dir(out, resume, overwrite=False, users=users) is False
        else:
            with pytest.raises(FileExistsError, match=f"^{re.escape(f'{out} {refusal}')} choose another --output-dir$"):
                check_output_dir(out, resume, overwrite=False, users=users)
        assert check_output_dir(out, resume, overwrite=True, users=users) is occupied  # cleared once the model loads
    assert check_output_dir(out, resume=True, overwrite=False) is False  # a single run's: train.py checks it
    assert check_output_dir(out, resume=True, overwrite=True) is False
    assert sorted(tmp_path.rglob("*")) == before  # it only checks: the caller clears


def test_each_users_dev_rows_are_held_out_of_their_own_rows():
    from prefixtune.data.records import Record
    from prefixtune.users.data import group_by_user, user_examples

    def records(counts):
        return [Record(f"{u} row {i}", [f"t{i}"], {"user": u}) for u, n in counts.items() for i in range(n)]

    cfg = SimpleNamespace(dev_fraction=0.2, seed=3, train_size=None, dev_size=100)  # the TrainConfig fields it reads
    train_a, dev_a = user_examples(group_by_user(records({"ann": 10, "bo": 20})), None, cfg)
    train_b, dev_b = user_examples(group_by_user(records({"ann": 10, "bo": 35, "cy": 1})), None, cfg)
    assert len(dev_a["ann"]) == 2 and len(train_a["ann"]) == 8 and len(dev_a["bo"]) == 4
    assert dev_a["ann"] == dev_b["ann"] and train_a["ann"] == train_b["ann"]  # bo's rows change nothing for ann
    assert dev_b["cy"] == [] and len(train_b["cy"]) == 1                       # a user keeps a training row
    assert not set(dev_a["bo"]) & set(train_a["bo"])


def test_the_server_starts_on_the_store_and_serves_every_user_their_own_prefix(tmp_path):
    """`prefixtune serve --store OUT/store` as it is: each user's name is a model, decoded with their own prefix."""
    import httpx
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefixtune.bank import PrefixBank
    from prefixtune.generation import DecodingConfig
    from prefixtune.models import freeze, load_base_model
    from prefixtune.serve import BackgroundServer, KeyRing, ServeSettings, create_app

    _, tokenizer = load_base_model("smollm2-135m")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         hidden_size=32, intermediate_size=64, vocab_size=len(tokenizer),
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    model.config._name_or_path = "tiny-llama"
    freeze(model)
    train_pairs, dev_pairs = user_data(3, 4)
    train_pairs["bob@example.com"] = train_pairs.pop("user1")
    result = train_users(config(tmp_path, "served", method="prefix-flat", max_steps=3, lr=0.5), model, tokenizer,
                         train_pairs, dev_pairs, users=UsersConfig(tenant="acme"), progress=False)
    settings = ServeSettings(store_dir=result.store, dtype="fp32")
    server = BackgroundServer(create_app(model, tokenizer, settings, KeyRing([("sk-acme-0123456789", "acme")]))).start()
    try:
        headers = {"Authorization": "Bearer sk-acme-0123456789"}
        listed = httpx.get(f"{server.url}/v1/models", headers=headers, timeout=60).json()["data"]
        assert sorted(m["id"] for m in listed[1:]) == ["bob-example.com", "user0", "user2"]
        bank, texts = PrefixBank(model, tokenizer), set()
        for name in ("user0", "bob-example.com", "user2"):
            answer = httpx.post(f"{server.url}/v1/completions", headers=headers, timeout=60, json={
                "model": name, "prompt": "user 0 : name area", "max_tokens": 8, "stop": []}).json()
            bank.add(name, store_dir(result.output_dir, "acme") / f"{name}.safetensors")
            ids = bank.generate_ids([bank.encode("user 0 : name area", name)], [name],
                                    DecodingConfig(max_new_tokens=8, stop_at_newline=False))[0]
            assert answer["choices"][0]["text"] == tokenizer.decode(ids, skip_special_tokens=True), name
            texts.add(answer["choices"][0]["text"])
        assert len(texts) == 3  # three users, three prefixes, three different answers
    finally:
        server.stop()


def invoke(*args):
    """`prefixtune train ARGS` in this process (typer's runner): its exit code, stdout and stderr."""
    from typer.testing import CliRunner

    from prefixtune.cli import app

    return CliRunner().invoke(app, ["train", *map(str, args)])


def user_rows(users, count: int) -> list[dict]:
    """`count` E2E-like rows per user, each target naming its user."""
    return [{"user": u, "input": f"name : Place {i} | food : Thai", "output": f"Place {i} by {u}."}
            for i in range(count) for u in users]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_train_user_field_refuses_torchrun(tmp_path, monkeypatch):
    """docs/users.md: --user-field does not run under torchrun. It ran: every process trained every user into
    the same store. Refused, before the data and the model load, with one error line."""
    data = write_rows(tmp_path / "users.jsonl", user_rows(("ann", "bo"), 2))
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = invoke("-o", tmp_path / "run", "--model", "/no/such/model", "--data", data, "--user-field", "user")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "not under torchrun (WORLD_SIZE=2)" in result.stderr and not (tmp_path / "run").exists()


def test_train_user_field_from_the_command_line(tmp_path, tiny_dir):
    rows = user_rows(("ann", "bo b"), 12)
    data = write_rows(tmp_path / "users.jsonl", rows)
    # refused before the model loads (the model path does not exist), one error line, nothing written
    clash = tmp_path / "clash.jsonl"
    clash.write_text("".join(json.dumps({**r, "user": r["user"].replace("ann", "bo-b")}) + "\n" for r in rows))
    for path, message in ((clash, "users 'bo-b' and 'bo b' would both be named 'bo-b'"),
                          (data, "field 'who' (--user-field)")):
        result = invoke("-o", tmp_path / "bad", "--model", "/no/such/model", "--data", path,
                        "--user-field", "who" if "who" in message else "user")
        assert result.exit_code == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
        assert not (tmp_path / "bad").exists()
    result = invoke("-o", tmp_path / "run", "--model", tiny_dir, "--data", data, "--user-field", "user",
                    "--tenant", "acme", "--max-steps", "2", "--method", "prefix-flat")
    assert result.exit_code == 0, (result.output, result.exception)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["users"] == 2 and summary["tenant"] == "acme" and summary["store"] == str(tmp_path / "run" / "store")
    assert "bo b  " in result.stdout and "prefix serve" not in result.stdout  # the table; the hint goes to stderr
    names = sorted(p.name for p in store_dir(tmp_path / "run", "acme").iterdir())
    assert names == ["ann.safetensors", "bo-b.safetensors"]
    csv_rows = (tmp_path / "run" / "users.csv").read_text().splitlines()
    assert csv_rows[1].startswith("ann,ann,11,1,2,2,")  # 12 rows, one held out for the dev loss, 2 steps
    again = invoke("-o", tmp_path / "run", "--model", tiny_dir, "--data", data, "--user-field", "user")
    assert again.exit_code == 2 and "holds a many-users run" in again.stderr
    refused = invoke("-o", tmp_path / "run", "--model", tiny_dir, "--data", data, "--user-field", "user",
                     "--tenant", "a/b")
    assert refused.exit_code == 2 and "tenant 'a/b' is not a valid tenant name" in refused.stderr, refused.stderr
    (store_dir(tmp_path / "run", "acme") / "bo-b.safetensors").unlink()  # as if killed before bo b was written
    resumed = invoke("-o", tmp_path / "run", "--model", tiny_dir, "--data", data, "--user-field", "user",
                     "--tenant", "acme", "--max-steps", "2", "--method", "prefix-flat", "--resume")
    assert resumed.exit_code == 0 and json.loads(resumed.stdout.strip().splitlines()[-1])["users"] == 2
    assert (tmp_path / "run" / "users.csv").read_text().splitlines() == csv_rows


def contents(path) -> tuple:
    """A safetensors file's tensors (as bytes) and metadata: its header's order is not fixed from run to run."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}


def test_a_bare_resume_finishes_a_many_users_job_with_its_options_and_runs_never_take_each_others_dirs(
        tmp_path, tiny_dir, llama, tokenizer):
    """`train -o OUT --resume` finishes the many-users job in OUT with its saved options (it said "written by
    another version"; with --user-field, a forgotten --max-steps retrained every user on the default schedule);
    a flag that contradicts them is refused; a single run and a many-users job never write into each other's
    directory without --overwrite."""
    data = write_rows(tmp_path / "users.jsonl", user_rows(("ann", "bob"), 8))
    out = tmp_path / "run"
    first = invoke("-o", out, "--model", tiny_dir, "--data", data, "--user-field", "user", "--tenant", "acme",
                   "--max-steps", "2", "--method", "prefix-flat")
    assert first.exit_code == 0, (first.output, first.exception)
    summary = (out / "users.csv").read_text()
    bob = store_dir(out, "acme") / "bob.safetensors"
    written = contents(bob)
    bob.unlink()  # as if killed before bob was written
    resumed = invoke("-o", out, "--resume")
    assert resumed.exit_code == 0, (resumed.output, resumed.exception)
    assert (out / "users.csv").read_text() == summary and contents(bob) == written  # 2 steps, tenant acme
    for flag, value, saved in (("--max-steps", "3", "2"), ("--tenant", "other", "'acme'")):
        refused = invoke("-o", out, "--resume", flag, value)
        assert refused.exit_code == 2 and f"with {flag} {saved}, not" in refused.stderr, refused.stderr
    with pytest.raises(ValueError, match="with max_steps 2, not 3"):  # from Python: named as the option
        train_users(TrainConfig(output_dir=str(out), max_steps=3), resume=True)
    taken = invoke("-o", out, "--model", "/no/such/model", "--data", data, "--user-field", "user")
    assert taken.exit_code == 2 and "holds a many-users run: pass --overwrite" in taken.stderr, taken.stderr  # first
    single = invoke("-o", out, "--model", tiny_dir, "--data", data, "--max-steps", "1")
    assert single.exit_code == 2 and "holds a many-users run (--user-field): pass --overwrite" in single.stderr
    with pytest.raises(ValueError, match="holds a many-users run"):
        train(TrainConfig(output_dir=str(out)), llama, tokenizer, [("a", "b")], resume=True, progress=False)
    assert (out / "users.csv").read_text() == summary and contents(bob) == written
    other = tmp_path / "single"
    other.mkdir()
    (other / "result.json").write_text("{}")  # a finished single run
    users = invoke("-o", other, "--model", tiny_dir, "--data", data, "--user-field", "user")
    assert users.exit_code == 2 and "holds a single-prefix run" in users.stderr, users.stderr
    assert sorted(p.name for p in other.iterdir()) == ["result.json"]


def test_every_model_family_trains_users_apart_and_as_alone(family, tokenizer, tmp_path):
    """Encoder-decoder models too (three prefix groups, rows padded on both sides): isolation to the bit
    and equivalence with `train` within the tolerance above."""
    model = tiny_model(family)
    train_pairs, dev_pairs = user_data(3, 6, seed=1)
    options = dict(method="prefix", precision="fp32", early_stop_patience=0)
    joint = train_users(config(tmp_path, "joint", **options), model, tokenizer, train_pairs, dev_pairs, progress=False)
    alone = train(config(tmp_path, "alone", **options), model, tokenizer, train_pairs["user1"], dev_pairs["user1"],
                  progress=False)
    ours, theirs = exported(joint, "user1"), load_file(alone.prefix_file)
    assert ours.keys() == theirs.keys()
    assert all((ours[k] - theirs[k]).abs().max() <= EQUIVALENCE_TOL * theirs[k].abs().max() for k in ours)
    changed = {**train_pairs, "user0": [(s, t + " and more") for s, t in train_pairs["user0"][:3]]}
    again = train_users(config(tmp_path, "again", **options), model, tokenizer, changed, dev_pairs,
                        users=UsersConfig(resident_users=1), progress=False)
    assert all(same_bytes(exported(joint, u), exported(again, u)) for u in ("user1", "user2"))


def test_the_frozen_bf16_weights_change_no_bit_of_a_users_prefix(llama, tokenizer, tmp_path, monkeypatch):
    """bf16 jobs cast the frozen weights once (precision.FrozenBf16Weights), not at every pass: the exported
    prefixes are those that autocast's own per-call casts give, to the bit."""
    import contextlib

    from prefixtune import precision

    train_pairs, dev_pairs = user_data(3, 5)
    cast_once = train_users(config(tmp_path, "once", precision="bf16"), llama, tokenizer, train_pairs, dev_pairs,
                            progress=False)
    swapped = []
    monkeypatch.setattr(precision, "FrozenBf16Weights", lambda model, skip=(): swapped.append(model) or contextlib.nullcontext())
    per_call = train_users(config(tmp_path, "per-call", precision="bf16"), llama, tokenizer, train_pairs, dev_pairs,
                           progress=False)
    assert swapped == [llama]  # the job did go through the swap
    for user in train_pairs:
        assert same_bytes(exported(cast_once, user), exported(per_call, user)), user
    assert all(p.dtype == torch.float32 for p in llama.parameters())  # the model is float32 again after the job


def on_two_threads(monkeypatch, run):
    """run() with two torch threads, where the trainers run their passes on two single-threaded workers
    (data_parallel.ThreadedHalves); returns how many times the workers ran."""
    from prefixtune import data_parallel

    calls = []
    mapped = data_parallel.ThreadedHalves.map
    monkeypatch.setattr(data_parallel.ThreadedHalves, "map", lambda self, *a: calls.append(1) or mapped(self, *a))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run()
    finally:
        torch.set_num_threads(before)
    return len(calls)


def test_on_two_threads_users_stay_independent_to_the_bit_and_equal_alone_runs(llama, tokenizer, tmp_path,
                                                                               monkeypatch):
    """The two tests above with the jobs' passes split over two worker threads (and `train`'s batches in
    halves): whoever shares a pass, a user's rows run together on one single-threaded worker."""
    runs = on_two_threads(monkeypatch, lambda: (
        test_changing_one_users_data_leaves_every_other_users_prefix_bit_identical(
            llama, tokenizer, tmp_path / "bits", "prefix", "auto"),
        test_a_user_trained_jointly_equals_that_user_trained_alone_by_train(
            llama, tokenizer, tmp_path / "alone", "prefix", 0.0),
        test_one_user_per_pass_keeps_users_apart_even_on_kernels_that_depend_on_the_row_count(
            llama, tokenizer, tmp_path / "row-variant")))
    assert runs > 0


def test_a_resume_removes_from_the_store_the_users_no_longer_in_the_data(llama, tokenizer, tmp_path, capsys):
    """A user removed from the data is no longer served after --resume (a deletion request is honoured); only the
    job's own files go: another tenant's, and a file written with other options, stay."""
    import shutil

    train_pairs, dev_pairs = user_data(3, 3)
    cfg = config(tmp_path, "run", method="prefix-flat", max_steps=1)
    first = train_users(cfg, llama, tokenizer, train_pairs, dev_pairs, progress=False)
    prefixes = store_dir(first.output_dir, "default")
    other_tenant = store_dir(first.output_dir, "acme")
    other_tenant.mkdir()
    shutil.copy(prefixes / "user1.safetensors", other_tenant / "user1.safetensors")
    foreign = train_users(config(tmp_path, "other", method="prefix-flat", max_steps=2), llama, tokenizer,
                          {"dave": train_pairs["user0"]}, progress=False)  # another job's user, other options
    shutil.copy(store_dir(foreign.output_dir, "default") / "dave.safetensors", prefixes / "dave.safetensors")
    capsys.readouterr()
    kept = {u: exported(first, u) for u in ("user0", "user2")}
    without = {u: p for u, p in train_pairs.items() if u != "user1"}
    resumed = train_users(cfg, llama, tokenizer, without, dev_pairs, resume=True)
    assert "removed from the store, no longer in the data: user1" in capsys.readouterr().err
    assert resumed.removed_users == ["user1"]
    assert sorted(p.name for p in prefixes.iterdir()) == ["dave.safetensors", "user0.safetensors",
                                                          "user2.safetensors"]
    assert all(same_bytes(kept[u], exported(resumed, u)) for u in kept)  # the others kept as they were
    assert (other_tenant / "user1.safetensors").is_file()
    summary = json.loads((tmp_path / "run" / "users.json").read_text())
    assert summary["removed_users"] == ["user1"] and [r["user"] for r in summary["users"]] == ["user0", "user2"]


def test_train_refuses_a_user_field_and_points_to_train_users(tmp_path):
    """train.train trains one prefix: with a user field it would mix every user's rows into it."""
    data = write_rows(tmp_path / "users.jsonl", user_rows(("ann", "bob"), 4))
    config = TrainConfig(output_dir=str(tmp_path / "out"), model="/no/such/model", data=str(data), user_field="user")
    with pytest.raises(ValueError, match=r"one prefix per user: call prefixtune\.users\.train_users"):
        train(config, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_job_started_with_a_relative_data_path_resumes_from_any_directory(tmp_path, tiny_dir, monkeypatch):
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir()
    elsewhere.mkdir()
    write_rows(start / "users.jsonl", user_rows(("ann", "bob"), 4))
    out = tmp_path / "run"
    monkeypatch.chdir(start)
    first = invoke("-o", out, "--model", tiny_dir, "--data", "users.jsonl", "--user-field", "user",
                   "--max-steps", "1", "--method", "prefix-flat")
    assert first.exit_code == 0, (first.output, first.exception)
    assert json.loads((out / "train_config.json").read_text())["data"] == str(start / "users.jsonl")
    bob = store_dir(out, "default") / "bob.safetensors"
    written = contents(bob)
    monkeypatch.chdir(elsewhere)
    for extra in ((), ("--data", start / "users.jsonl")):
        bob.unlink()  # as if killed before bob was written
        resumed = invoke("-o", out, "--resume", *extra)
        assert resumed.exit_code == 0, (resumed.output, resumed.exception)
        assert contents(bob) == written
    refused = invoke("-o", out, "--resume", "--data", "users.jsonl")  # another file: elsewhere/users.jsonl
    assert refused.exit_code == 2 and "with --data" in refused.stderr, refused.stderr


def test_early_stop_patience_from_the_command_line(tmp_path, tiny_dir):
    """--early-stop-patience (docs/users.md names it) reaches both a single run and a many-users job."""
    data = write_rows(tmp_path / "users.jsonl", user_rows(("ann", "bob"), 4))
    common = ("--model", tiny_dir, "--data", data, "--max-steps", "2", "--method", "prefix-flat",
              "--early-stop-patience", "3")
    for name, extra in (("single", ()), ("users", ("--user-field", "user"))):
        result = invoke("-o", tmp_path / name, *common, *extra)
        assert result.exit_code == 0, (result.output, result.exception)
        assert json.loads((tmp_path / name / "train_config.json").read_text())["early_stop_patience"] == 3
    refused = invoke("-o", tmp_path / "bad", *common[:-1], "-1")
    assert refused.exit_code == 2 and "early_stop_patience must be >= 0" in refused.stderr, refused.stderr


def poison_user1_after_step_2(monkeypatch):
    """user1's weights turn NaN after their step 2, as a diverging rate would make them."""
    from prefixtune.users.state import UserState

    step_with = UserState.step_with

    def poisoned(self, *args):
        step_with(self, *args)
        if self.user == "user1" and self.step == 2:
            with torch.no_grad():
                for p in self.module.parameters():
                    p.fill_(float("nan"))

    monkeypatch.setattr(UserState, "step_with", poisoned)


def test_a_user_whose_training_diverges_stops_at_their_best_step_and_no_other_user_changes(llama, tokenizer,
                                                                                          tmp_path, monkeypatch):
    # a NaN/inf loss trained every later step on NaN and wrote to the store (and so served) a prefix that gives
    # NaN, its NaN dev loss as the best; user1's weights are made NaN after their step 2 (as a diverging rate would)
    train_pairs, dev_pairs = user_data(2, 6)
    cfg = dict(precision="fp32", max_steps=4, eval_every=1, early_stop_patience=0)
    clean = train_users(config(tmp_path, "clean", **cfg), llama, tokenizer, train_pairs, dev_pairs, progress=False)
    poison_user1_after_step_2(monkeypatch)
    result = train_users(config(tmp_path, "nan", **cfg), llama, tokenizer, train_pairs, dev_pairs, progress=False)
    row = {r["user"]: r for r in result.users}["user1"]
    assert (row["stop_reason"], row["steps"]) == ("diverged", 3) and row["best_step"] <= 2
    assert all(torch.isfinite(t).all() for t in exported(result, "user1").values())
    assert same_bytes(exported(result, "user0"), exported(clean, "user0"))
    with pytest.raises(ValueError, match="user 'user1': training diverged: the loss is nan at step 3"):
        train_users(config(tmp_path, "nodev", **cfg), llama, tokenizer, train_pairs, {}, progress=False)


def strict_json(text: str):
    """JSON as the standard has it: Python's json reads NaN and Infinity, which other readers refuse."""
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


def test_a_diverged_users_non_finite_loss_is_written_as_null_not_nan(llama, tokenizer, tmp_path, monkeypatch):
    """A user whose loss diverged has a NaN last training loss: users.json held `NaN` (not JSON: a JavaScript or
    jq reader refuses the file), users.csv `nan`, and their prefix's metadata `NaN`. Now null, an empty cell."""
    import csv

    from prefixtune.exported import read_header

    train_pairs, dev_pairs = user_data(2, 6)
    poison_user1_after_step_2(monkeypatch)
    cfg = config(tmp_path, "nan", precision="fp32", max_steps=4, eval_every=1, early_stop_patience=0)
    result = train_users(cfg, llama, tokenizer, train_pairs, dev_pairs, progress=False)
    out = tmp_path / "nan"
    rows = {r["user"]: r for r in strict_json((out / "users.json").read_text())["users"]}
    assert rows["user1"]["stop_reason"] == "diverged" and rows["user1"]["last_train_loss"] is None
    assert rows["user1"]["final_dev_loss"] is None  # measured on the NaN weights after step 2
    assert isinstance(rows["user0"]["last_train_loss"], float)  # a finite loss stays a number
    assert {r["user"]: r for r in result.users}["user1"]["last_train_loss"] is None
    csv_rows = {r["user"]: r for r in csv.DictReader((out / "users.csv").read_text().splitlines())}
    assert csv_rows["user1"]["last_train_loss"] == "" and csv_rows["user0"]["last_train_loss"] not in ("", "nan")
    meta = read_header(store_dir(out, result.tenant) / f"{prefix_name('user1')}.safetensors")[0]
    assert strict_json(meta["train_config"])["summary"]["last_train_loss"] is None
