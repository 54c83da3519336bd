"""`prefixattn demo`: runs end to end with few steps, learns its task, and refuses bad input clearly."""

import re
import shutil
from pathlib import Path

import pytest
import torch

from prefixattn import cli, demo


def test_demo_runs_learns_and_reports(tmp_path, capsys):
    rc = demo.main(["--steps", "60", "--out", str(tmp_path), "--seed", "1"])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    assert "train [" in err and "60/60" in err  # the progress bar
    assert re.search(r"1/60 loss [\d.]+ \d+s, ~\d+s left", err)  # from the first step, with an estimate
    assert "next-character accuracy" in out
    before, after = map(int, re.search(r"(\d+)% without the prefix -> (\d+)% with it", out).groups())
    assert before <= 20 and after == 100
    assert "outputs identical: True" in out
    assert re.search(r"exact 'quick brown': [01]/5 without, 5/5 with", out)
    assert "model unchanged after all three: True" in out and "NOT refused" not in out
    assert "the cache holds 15 tokens per sequence" in out and "Llama-3.2-1B" in out
    assert (tmp_path / "ejected" / "prefixattn_adapter.safetensors").exists()
    assert (tmp_path / "mlp" / "prefixattn_config.json").exists()


def test_defaults_depend_on_the_model():
    builtin = demo.parse_args([])
    assert (builtin.steps, builtin.batch, builtin.lr) == (300, 32, 1e-2)
    real = demo.parse_args(["--model", "some/dir"])  # a real model: fewer, cheaper steps at a gentler lr
    assert (real.steps, real.batch, real.lr) == (40, 8, 1e-3)
    given = demo.parse_args(["--model", "some/dir", "--steps", "7", "--lr", "0.5"])
    assert (given.steps, given.batch, given.lr) == (7, 8, 0.5)


def test_model_with_a_tokenizer_reports_token_accuracy_and_keeps_its_folder(tmp_path, capsys):
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<unk>", "=", *demo.TARGET.split(), *demo.WORDS, *" ".join(demo.HELD_OUT).split()]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(dict.fromkeys(words))}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    cfg = demo.small_config(len(fast))
    tf.LlamaForCausalLM(cfg).save_pretrained(str(tmp_path / "m"))
    fast.save_pretrained(str(tmp_path / "m"))
    rc = demo.main(["--model", str(tmp_path / "m"), "--steps", "3"])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    assert "training: 3 steps, batch 8, Adam lr 0.001" in out
    assert "next-token accuracy" in out and "next-character" not in out
    folder = re.search(r"saving the adapter under (\S+); a temporary folder, left on disk", out).group(1)
    assert (Path(folder) / "ejected" / "prefixattn_config.json").exists()
    shutil.rmtree(folder)


def test_cli_dispatches_demo(capsys):
    assert cli.main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--help"])
    assert e.value.code == 0
    assert "--prefix-length" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--model", "/nonexistent/model"], "--model: '/nonexistent/model' is not a directory"),
        (["--steps", "0"], "--steps: expected a positive int, got 0"),
        (["--prefix-length", "-1"], "--prefix-length: expected a positive int"),
    ],
)
def test_bad_arguments_give_one_clear_line(argv, match, capsys):
    assert demo.main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_model_path_local_checkpoint_and_unsupported_type(tmp_path, capsys):
    import transformers as tf

    torch.manual_seed(0)
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=48, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    gpt2.save_pretrained(str(tmp_path / "gpt2"))
    rc = demo.main(["--model", str(tmp_path / "gpt2"), "--steps", "5", "--out", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    assert "GPT2LMHeadModel from" in out and "outputs identical: True" in out

    opt = tf.OPTForCausalLM(
        tf.OPTConfig(
            vocab_size=48,
            hidden_size=16,
            num_hidden_layers=1,
            ffn_dim=32,
            num_attention_heads=2,
            max_position_embeddings=32,
            word_embed_proj_dim=16,
        )
    )
    opt.save_pretrained(str(tmp_path / "opt"))
    assert demo.main(["--model", str(tmp_path / "opt"), "--steps", "5"]) == 2
    err = capsys.readouterr().err
    assert "model type 'opt'" in err and "supported model types" in err


@pytest.mark.gpu
def test_demo_on_the_gpu_kernels(tmp_path, capsys):
    # bf16 model, backend "auto" = the kernels for training, eject, reload and generate.
    rc = demo.main(["--steps", "150", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    assert "device cuda" in out and "outputs identical: True" in out
    after = int(re.search(r"-> (\d+)% with it", out).group(1))
    hits = int(re.search(r"(\d)/5 with$", out, re.M).group(1))
    assert after >= 90 and hits >= 4  # bf16: allow one near-tie to flip
