"""Hugging Face interop: a Llama folder imports with equal logits, and a vanilla run exports as one."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ponderlm
from ponderlm.rundir import RunDir
from ponderlm.cli import main
from ponderlm.config import load_config
from ponderlm.engine import Engine, teacher_forced
from ponderlm.errors import PonderError
from ponderlm.methods import METHODS
from ponderlm.generate import generate, generate_many
from ponderlm.train import train

FIXTURE_TEXTS = sorted((Path(__file__).parent / "fixtures" / "text").glob("*.txt"))
transformers = pytest.importorskip("transformers")  # installed by `make test` (the `hf` extra)


def assert_one_line_error(code, err, *fragments):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ponderlm: error: "), err
    assert all(fragment in lines[0] for fragment in fragments), lines[0]


def llama_folder(path, tokenizer_file, dtype=torch.float32, tied=True, shard_size=None):
    """A randomly initialised LlamaForCausalLM with grouped-query attention, saved as a user's folder would be."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
        tie_word_embeddings=tied, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # larger than the HF init, so a wrong mapping shows in the logits
            parameter.normal_(0, 0.2)
    model.to(dtype).save_pretrained(path, **({"max_shard_size": shard_size} if shard_size else {}))
    shutil.copyfile(tokenizer_file, path / "tokenizer.json")
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("dtype, tied, shard_size", [(torch.float32, True, None), (torch.bfloat16, False, "60KB")])
def test_an_imported_llama_computes_the_logits_of_transformers(dtype, tied, shard_size, tiny_data_dir, tmp_path,
                                                               capsys):
    hf = llama_folder(tmp_path / "hf", tiny_data_dir / "tokenizer.json", dtype, tied, shard_size)
    assert (shard_size is None) != (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run"), "--set", "data.seq_len=32"]) == 0
    capsys.readouterr()
    model, _ = ponderlm.load(tmp_path / "run")
    assert model.config.model.num_key_value_heads == 2 and model.backbone.embed_scale == 1.0
    assert (model.backbone.lm_head.weight is model.backbone.embed_tokens.weight) == tied
    ids = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        expected = hf(ids).logits
        got = model(ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert Engine(model, max_batch=2).cache.keys.shape[2] == 2  # the KV cache holds the 2 key/value heads
    for prefill in (True, False):  # and decodes the same logits, from a prefill or slot by slot
        torch.testing.assert_close(teacher_forced(model, ids, prefill=prefill)[0], expected, rtol=0, atol=1e-4)


def test_a_latent_method_on_an_imported_backbone_trains_and_evaluates(tiny_data_dir, tmp_path, capsys):
    hf = llama_folder(tmp_path / "hf", tiny_data_dir / "tokenizer.json")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run"), "--method", "ponderlm3",
                 "--set", "ponder.extra_steps=2", "--set", f"data.path={tiny_data_dir}", "--set",
                 "data.seq_len=32"]) == 0
    model, _ = ponderlm.load(tmp_path / "run")
    hf_layer = hf.model.layers[1].self_attn
    torch.testing.assert_close(model.backbone.layers[1].self_attn.qkv_proj.weight,
                               torch.cat([hf_layer.q_proj.weight, hf_layer.k_proj.weight, hf_layer.v_proj.weight]))
    assert model.router.weight.abs().sum() == 0  # the method's own parts keep their usual init
    assert main(["eval", str(tmp_path / "run"), "--max-tokens", "256"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mean_extra_steps"] >= 0


def test_import_errors_are_one_line(tiny_data_dir, tmp_path, capsys):
    llama_folder(tmp_path / "hf", tiny_data_dir / "tokenizer.json")
    capsys.readouterr()  # transformers' own progress bars
    assert_one_line_error(main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "r"), "--set",
                                "model.hidden_size=32"]), capsys.readouterr().err,
                          "the model shape comes from", "model.hidden_size")
    assert not (tmp_path / "r").exists()
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k != "model.norm.weight"}, tmp_path / "hf" / "model.safetensors",
              metadata={"format": "pt"})
    assert_one_line_error(main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "r")]),
                          capsys.readouterr().err, "lacks the tensor 'norm.weight' of a 2-layer Llama")
    assert not (tmp_path / "r").exists()
    (tmp_path / "hf" / "tokenizer.json").unlink()
    assert_one_line_error(main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "r")]),
                          capsys.readouterr().err, "has no tokenizer.json")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    assert_one_line_error(main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "r")]),
                          capsys.readouterr().err, "model_type 'gpt2'; only llama imports")


def test_a_vanilla_run_exports_to_a_llama_that_transformers_loads_with_equal_logits(tiny_data_dir, tmp_path,
                                                                                   capsys):
    run = tmp_path / "run"
    train(load_config("tiny", [f"data.path={tiny_data_dir}", "train.steps=2"]), run, progress=False)
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    model, tokenizer = ponderlm.load(run)
    text = "The king sent his letters"
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text).ids
    ids = torch.randint(0, model.config.model.vocab_size, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=0, atol=1e-4)
    # and back: importing the export gives the run's logits again
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back"), "--set", "data.seq_len=32"]) == 0
    back, _ = ponderlm.load(tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids), rtol=0, atol=1e-4)



def test_continued_pretraining_of_an_imported_llama_with_ponderlm3(tiny_data_dir, tmp_path, capsys):
    """prepare data with the model's own tokenizer, then train ponderlm3 from the Llama's weights for a few steps."""
    hf = llama_folder(tmp_path / "hf", tiny_data_dir / "tokenizer.json")
    data = tmp_path / "data"
    assert main(["data", "prepare", "--out", str(data), "--files", *map(str, FIXTURE_TEXTS), "--tokenizer",
                 str(tmp_path / "hf")]) == 0
    meta = json.loads((data / "metadata.json").read_text())
    assert meta["tokenizer"]["kind"] == "file" and (data / "tokenizer.json").read_bytes() == \
        (tmp_path / "hf" / "tokenizer.json").read_bytes()
    capsys.readouterr()
    run = tmp_path / "run"
    assert main(["train", "tiny", "--init-from", str(tmp_path / "hf"), "--out", str(run), "--set",
                 f"data.path={data}", "--set", "method=ponderlm3", "--set", "ponder.extra_steps=2",
                 "--set", "train.steps=3", "--set", "train.save_every=3"]) == 0
    capsys.readouterr()
    model, _ = ponderlm.load(run)
    assert model.config.model.num_key_value_heads == 2 and model.config.model.hidden_size == 64
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(first["loss"])
    # the run started from the Llama: after 3 small steps its weights are still close to the imported ones
    start = hf.model.layers[0].mlp.down_proj.weight
    moved = (model.backbone.layers[0].mlp.down_proj.weight - start).abs().max().item()
    assert 0 < moved < 0.05 < start.abs().max().item()
    code = main(["train", "tiny", "--init-from", str(tmp_path / "hf"), "--out", str(tmp_path / "r2"), "--set",
                 f"data.path={tiny_data_dir}", "--set", "model.num_key_value_heads=4"])
    assert_one_line_error(code, capsys.readouterr().err, "the model shape comes from --init-from",
                          "model.num_key_value_heads")
    (tmp_path / "hf" / "tokenizer.json").write_text((tmp_path / "hf" / "tokenizer.json").read_text() + " ")
    code = main(["train", "tiny", "--init-from", str(tmp_path / "hf"), "--out", str(tmp_path / "r3"), "--set",
                 f"data.path={data}"])
    assert_one_line_error(code, capsys.readouterr().err, "was not tokenized with the tokenizer of --init-from",
                          "data prepare --tokenizer")
    assert not (tmp_path / "r3").exists()


def test_continued_pretraining_from_a_run_directory_starts_from_its_weights(tiny_data_dir, tmp_path, capsys):
    source = tmp_path / "vanilla"
    train(load_config("tiny", [f"data.path={tiny_data_dir}", "train.steps=2"]), source, progress=False)
    assert main(["train", "tiny", "--init-from", str(source), "--out", str(tmp_path / "p2"), "--set",
                 f"data.path={tiny_data_dir}", "--set", "method=ponderlm2", "--set", "ponder.extra_steps=1",
                 "--set", "train.steps=1", "--set", "train.lr=1e-9", "--set", "train.warmup_steps=0"]) == 0
    capsys.readouterr()
    before, _ = ponderlm.load(source)
    after, _ = ponderlm.load(tmp_path / "p2")
    torch.testing.assert_close(after.backbone.norm.weight, before.backbone.norm.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(after.backbone.lm_head.weight, before.backbone.lm_head.weight, rtol=0, atol=1e-6)


def test_a_ponderlm3_run_exports_with_its_modeling_code_and_generates(tiny_data_dir, tmp_path, capsys):
    run = tmp_path / "p3"
    train(load_config("tiny", [f"data.path={tiny_data_dir}", "train.steps=2", "method=ponderlm3",
                               "ponder.extra_steps=2"]), run, progress=False)
    model, tokenizer = ponderlm.load(run)
    with torch.no_grad():  # a decisive router, so that tau prunes some tokens and not others
        model.router.weight.normal_(0, 0.5)
    weights = tmp_path / "p3" / "checkpoints" / "step_0000002"
    RunDir(run).save_checkpoint(3, model.state_dict(), {"step": 3}, {"method": "ponderlm3"}, keep_last=1)
    assert not weights.exists()
    assert main(["export", str(run), "--out", str(tmp_path / "hf"), "--tau", "0.3"]) == 0
    capsys.readouterr()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    ids = torch.randint(0, model.config.model.vocab_size, (2, 20))
    with torch.no_grad():
        expected, steps = model.infer(ids, 0.3)
        torch.testing.assert_close(hf(ids).logits, expected, rtol=0, atol=1e-5)
    assert 0 < steps.float().mean() < 2  # the export runs the pruned path at its tau
    prompt = torch.tensor([tokenizer.encode("The king").ids])
    generated = hf.generate(prompt, max_new_tokens=6, do_sample=False)
    ours = generate(model, tokenizer, "The king", max_new_tokens=6, tau=0.3)
    assert tokenizer.decode(generated[0, prompt.shape[1]:].tolist()).startswith(ours)


def test_a_run_killed_before_its_first_checkpoint_resumes_from_its_init_from_source(tiny_data_dir, tmp_path,
                                                                                     capsys):
    source = tmp_path / "vanilla"
    train(load_config("tiny", [f"data.path={tiny_data_dir}", "train.steps=2"]), source, progress=False)
    run = tmp_path / "continued"
    args = ["train", "tiny", "--init-from", str(source), "--out", str(run), "--set", f"data.path={tiny_data_dir}",
            "--set", "train.steps=1", "--set", "train.lr=1e-9", "--set", "train.warmup_steps=0"]
    assert main(args) == 0
    shutil.rmtree(run / "checkpoints")  # as if killed after writing config.yaml, before the first checkpoint
    (run / "metrics.jsonl").unlink()
    assert main(["train", "--out", str(run), "--resume"]) == 0
    capsys.readouterr()
    before, _ = ponderlm.load(source)
    after, _ = ponderlm.load(run)
    torch.testing.assert_close(after.backbone.lm_head.weight, before.backbone.lm_head.weight, rtol=0, atol=1e-6)


def _break(folder: Path, how: str) -> None:
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if how == "list":
        config_path.write_text(json.dumps([config]))
    elif how in ("no hidden_size", "zero heads"):
        config.pop("hidden_size") if how == "no hidden_size" else config.update(num_attention_heads=0)
        config_path.write_text(json.dumps(config))
    elif how == "wrong shapes":
        weights = load_file(folder / "model.safetensors")
        weights["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 40)
        save_file(weights, folder / "model.safetensors")
    elif how == "broken index":
        (folder / "model.safetensors.index.json").write_text('{"weight_map": ')
    elif how == "nan":
        weights = load_file(folder / "model.safetensors")
        weights["model.norm.weight"][3] = float("nan")
        save_file(weights, folder / "model.safetensors")


@pytest.mark.parametrize("how,message", [
    ("list", "holds a JSON list, not a model config"),
    ("no hidden_size", "hidden_size is None; a Llama config needs a positive integer"),
    ("zero heads", "num_attention_heads is 0"),
    ("wrong shapes", "its tensors do not have the shapes its config.json describes"),
    ("broken index", "model.safetensors.index.json is not a safetensors index"),
    ("nan", "holds non-finite values (NaN or inf) in backbone.norm.weight: the source model is damaged"),
])
def test_a_damaged_llama_folder_is_one_line_for_import_and_init_from_and_leaves_nothing(how, message, tiny_data_dir,
                                                                                      tmp_path, capsys):
    llama_folder(tmp_path / "hf", tiny_data_dir / "tokenizer.json")
    _break(tmp_path / "hf", how)
    capsys.readouterr()
    code = main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")])
    assert_one_line_error(code, capsys.readouterr().err, message)
    code = main(["train", "tiny", "--init-from", str(tmp_path / "hf"), "--out", str(tmp_path / "run2"), "--set",
                 f"data.path={tiny_data_dir}"])
    assert_one_line_error(code, capsys.readouterr().err, message)
    assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()


def test_import_into_a_used_folder_suggests_overwrite_not_resume(tiny_data_dir, tmp_path, capsys):
    llama_folder(tmp_path / "hf", tiny_data_dir / "tokenizer.json")
    capsys.readouterr()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    code = main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert_one_line_error(code, err, "is not empty; choose a new --out, or pass --overwrite")
    assert "--resume" not in err


def test_init_from_with_another_tokenizer_names_the_tokenizer_not_the_vocabulary_size(tiny_data_dir, tmp_path,
                                                                                     capsys):
    source = tmp_path / "vanilla"
    train(load_config("tiny", [f"data.path={tiny_data_dir}", "train.steps=1"]), source, progress=False)
    bigger = tmp_path / "bigger"  # a data directory whose tokenizer has more tokens than the source's
    assert main(["data", "prepare", "--out", str(bigger), "--files", *map(str, FIXTURE_TEXTS), "--vocab-size",
                 "700"]) == 0
    capsys.readouterr()
    code = main(["train", "tiny", "--init-from", str(source), "--out", str(tmp_path / "r"), "--set",
                 f"data.path={bigger}"])
    err = capsys.readouterr().err
    assert_one_line_error(code, err, "was not tokenized with the tokenizer of --init-from")
    assert "vocab_size" not in err


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_exports_to_transformers_with_equal_logits_tied_or_not(method, tied, tiny_data_dir, tmp_path,
                                                                           capsys):
    """A tied run stores the shared matrix once; transformers must tie it again on loading (it used to leave the
    lm-head randomly initialised: logits 18.9 off)."""
    run = tmp_path / "run"
    train(load_config("tiny", [f"data.path={tiny_data_dir}", "train.steps=1", f"method={method}",
                               f"model.tie_word_embeddings={str(tied).lower()}", "model.embedding_scale=false"],
                      shared=["ponder.extra_steps=2"]), run, progress=False)
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    model, _ = ponderlm.load(run)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    ids = torch.randint(0, model.config.model.vocab_size, (2, 12))
    with torch.no_grad():
        expected = model.infer(ids)[0]
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=1e-5)


def test_an_imported_model_keeps_its_own_context(tiny_data_dir, tmp_path, capsys):
    llama_folder(tmp_path / "hf", tiny_data_dir / "tokenizer.json")  # max_position_embeddings 64
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    model, _ = ponderlm.load(tmp_path / "run")
    assert model.config.data.seq_len == 64
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "back")]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "back" / "config.json").read_text())["max_position_embeddings"] == 64


def instruct_llama_folder(path, tokenizer_dir):
    """A tied, grouped-query instruct Llama whose context (128) exceeds the tiny preset's (32), with chat tokens, a
    chat template and two end tokens: as a user's folder of one would be (save_pretrained writes its
    generation_config.json)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=128, bos_token_id=2,
        eos_token_id=[0, 1], pad_token_id=0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
        model.model.embed_tokens.weight[1] *= 5  # so that greedy decoding ends at the second end token, soon
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, path / name)
    return model


def assert_same_special_tokens(folder, source, context):
    """An exported folder names the source's special tokens, chat template and generation config."""
    config = json.loads((folder / "config.json").read_text())
    assert (config["eos_token_id"], config["bos_token_id"], config["max_position_embeddings"]) == ([0, 1], 2, context)
    assert json.loads((folder / "generation_config.json").read_text()) == \
        json.loads((source / "generation_config.json").read_text())
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert {key: tokenizer_config[key] for key in ("eos_token", "bos_token", "pad_token", "chat_template")} == \
        {key: json.loads((source / "tokenizer_config.json").read_text())[key]
         for key in ("eos_token", "bos_token", "pad_token", "chat_template")}
    assert tokenizer_config["model_max_length"] == context


def test_an_instruct_llama_goes_import_eval_chat_continued_pretraining_export(instruct_tokenizer_dir, tmp_path,
                                                                              capsys):
    hf_dir, data = tmp_path / "hf", tmp_path / "data"
    hf = instruct_llama_folder(hf_dir, instruct_tokenizer_dir)
    assert main(["data", "prepare", "--out", str(data), "--files", *map(str, FIXTURE_TEXTS), "--tokenizer",
                 str(hf_dir)]) == 0
    assert json.loads((data / "metadata.json").read_text())["tokenizer"]["eos_id"] == 0  # <|im_end|>, as named
    assert main(["import", str(hf_dir), "--out", str(tmp_path / "run")]) == 0
    assert main(["eval", str(tmp_path / "run"), "--data", str(data), "--split", "val"]) == 0
    capsys.readouterr()
    model, tokenizer = ponderlm.load(tmp_path / "run")
    assert model.config.data.seq_len == 128 and tokenizer.stop_ids == (0, 1)

    # chat: the template's ids and transformers' greedy answer, which stops at the model's own end token
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    messages = [{"role": "user", "content": "Who was the king?"}]
    prompt = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                              return_dict=False)
    assert prompt[0].tolist() == tokenizer.encode_chat(messages)
    theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False)[0, prompt.shape[1]:].tolist()
    ours = generate_many(model, tokenizer, ["Who was the king?"], max_new_tokens=20, chat=True)[0]
    assert len(theirs) > 1 and theirs[-1] == 1 and ours.finish_reason == "stop"
    assert ours.text == hf_tokenizer.decode(theirs, skip_special_tokens=True)
    assert main(["generate", str(tmp_path / "run"), "--chat", "--prompt", "Who was the king?"]) == 0
    assert capsys.readouterr().out == ours.text + "\n"

    # continued pretraining keeps the context and the tokenizer files; both exports carry them to transformers
    assert main(["train", "tiny", "--init-from", str(hf_dir), "--out", str(tmp_path / "p3"), "--set",
                 f"data.path={data}", "--set", "method=ponderlm3", "--set", "ponder.extra_steps=2", "--set",
                 "train.steps=2"]) == 0
    for run, remote in ((tmp_path / "run", False), (tmp_path / "p3", True)):
        out = tmp_path / f"export-{run.name}"
        assert main(["export", str(run), "--out", str(out)]) == 0
        capsys.readouterr()
        assert_same_special_tokens(out, hf_dir, 128)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=remote).eval()
        model, tokenizer = ponderlm.load(run)
        ids = torch.randint(0, 400, (2, 60))
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, model.infer(ids)[0], rtol=0, atol=1e-4)
        exported_tokenizer = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=remote)
        assert exported_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False) == \
            tokenizer.encode_chat(messages)


def test_the_library_starts_from_a_source_as_the_command_line_does(tiny_data_dir, tmp_path, capsys):
    """`init_from_config` is what `train --init-from` uses; a config built by hand with another shape is refused
    before anything is written, with the way to build it."""
    from ponderlm.sources import CONTINUED_LR_FRACTION, CONTINUED_METHOD_LR_SCALE, init_from_config

    source = tmp_path / "vanilla"
    train(load_config("tiny", [f"data.path={tiny_data_dir}", "train.steps=2", "model.hidden_size=32"]), source,
          progress=False)
    overrides = [f"data.path={tiny_data_dir}", "method=ponderlm3", "ponder.extra_steps=2", "train.steps=1"]
    assert main(["train", "tiny", "--init-from", str(source), "--out", str(tmp_path / "cli"),
                 *[arg for o in overrides for arg in ("--set", o)]]) == 0
    capsys.readouterr()
    config = init_from_config("tiny", source, overrides)
    assert (tmp_path / "cli" / "config.yaml").read_text() == config.to_yaml()
    # continued pretraining: a fraction of the preset's learning rate, the router faster, unless the user says
    assert config.train.lr == pytest.approx(load_config("tiny").train.lr * CONTINUED_LR_FRACTION)
    assert config.train.method_lr_scale == CONTINUED_METHOD_LR_SCALE > 1
    given = init_from_config("tiny", source, [*overrides, "train.lr=0.25", "train.method_lr_scale=1"])
    assert (given.train.lr, given.train.method_lr_scale) == (0.25, 1)
    by_hand = load_config("tiny", [*overrides, f"train.init_from={source}"])  # the preset's hidden size, 64
    with pytest.raises(PonderError, match="model.hidden_size is 64 but train.init_from .* has 32; build the config "
                                          "with ponderlm.sources.init_from_config"):
        train(by_hand, tmp_path / "by-hand", progress=False)
    assert not (tmp_path / "by-hand").exists()
    train(config, tmp_path / "library", progress=False)
    first = [json.loads(line) for line in (tmp_path / "library" / "metrics.jsonl").read_text().splitlines()][0]
    cli_first = [json.loads(line) for line in (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()][0]
    assert first["loss"] == cli_first["loss"]
