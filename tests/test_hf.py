"""Hugging Face interop: a Llama folder imports with equal logits, and a vanilla run exports as one."""

import json
import shutil

import pytest
import torch

import ponderlm
from ponderlm.cli import main
from ponderlm.config import load_config
from ponderlm.train import train

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
    cache = model.new_cache(2, 30)  # the KV cache holds 2 key/value heads and decodes the same logits
    with torch.no_grad():
        model.decode(ids[:, :20], cache)
        last = model.decode(ids[:, 20:], cache)
    assert cache.keys.shape[2] == 2
    torch.testing.assert_close(last, expected[:, -1], rtol=0, atol=1e-4)


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
    p3 = tmp_path / "p3"
    train(load_config("tiny", [f"data.path={tiny_data_dir}", "train.steps=1", "method=ponderlm3"]), p3,
          progress=False)
    capsys.readouterr()
    assert_one_line_error(main(["export", str(p3), "--out", str(tmp_path / "hf3")]), capsys.readouterr().err,
                          "is a ponderlm3 run; only vanilla runs export")
