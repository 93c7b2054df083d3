"""Tokenizers: the byte tokenizer's ids, SentencePiece trained by `crucible tokenizer train`, a Hugging Face
tokenizer.json, and the model's vocabulary following `data.tokenizer` at config load."""

import pathlib
import pickle

import numpy as np
import pytest

from crucible_jax import cli
from crucible_jax.config import ConfigError, load_experiment
from crucible_jax.data.tokenizers import ByteTokenizer, build_tokenizer
from crucible_jax.data.tokenizers.hf import HFTokenizer

OWN_DATA = str(pathlib.Path(__file__).parent.parent / "experiments" / "own_data.py")


def test_byte_tokenizer_ids_are_utf8_bytes_plus_one():
  tok = ByteTokenizer(12)
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 0, 257, 258)
  ids = tok.encode("a猫", add_bos=True, add_eos=True)
  assert ids.dtype == np.int32 and ids.tolist() == [257, 98, 0xE7 + 1, 0x8C + 1, 0xAB + 1, 258] + [0] * 6
  assert tok.decode(ids) == "a猫"
  with pytest.raises(ValueError, match="needs 13 tokens"):
    tok.encode("x" * 13)
  with pytest.raises(ValueError, match="empty"):
    tok.encode("  ")


def test_byte_fit_cuts_at_a_character_boundary():
  tokens, cut = ByteTokenizer(4).fit("ab猫")  # 'ab' + 3 bytes: the cat does not fit whole
  assert cut and tokens.tolist() == [98, 99, 0, 0]
  tokens, cut = ByteTokenizer(5).fit("ab猫")
  assert not cut and ByteTokenizer(5).decode(tokens) == "ab猫"


@pytest.fixture(scope="module")
def spm_model(own_collection, tmp_path_factory) -> str:
  out = str(tmp_path_factory.mktemp("spm") / "captions.model")
  assert cli.main(["tokenizer", "train", "--manifest", own_collection["manifest"], "--vocab-size", "60",
                   "--out", out]) == 0
  return out


def test_sentencepiece_trained_on_captions_round_trips(spm_model):
  tok = build_tokenizer("sentencepiece", spm_model, 16)
  assert tok.pad_id == 0 and 20 < tok.vocab_size <= 60 and len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3
  ids = tok.encode("a handwritten seven", add_eos=True)
  assert ids.shape == (16,) and ids.max() < tok.vocab_size and ids.tolist().count(tok.eos_id) == 1
  assert np.count_nonzero(ids) < len("a handwritten seven")  # pieces, not characters
  assert tok.decode(ids) == "a handwritten seven"
  clone = pickle.loads(pickle.dumps(tok))  # grain workers receive it pickled
  np.testing.assert_array_equal(clone.encode("seven in pen"), tok.encode("seven in pen"))


def test_config_takes_the_vocabulary_from_the_tokenizer(own_collection, spm_model, tmp_path):
  base = [f"--config.data.manifest={own_collection['manifest']}"]
  byte = load_experiment(f"{OWN_DATA}:tiny", base)
  assert byte.model.text.vocab_size == 259
  big = tmp_path / "big.model"
  assert cli.main(["tokenizer", "train", "--manifest", own_collection["manifest"], "--vocab-size", "320",
                   "--out", str(big), "--model-type", "bpe", "--byte-fallback"]) == 0
  spm = load_experiment(f"{OWN_DATA}:tiny", base + ["--config.data.tokenizer.kind=sentencepiece",
                                                    f"--config.data.tokenizer.path={big}"])
  assert spm.model.text.vocab_size == build_tokenizer("sentencepiece", str(big), 32).vocab_size > 259
  with pytest.raises(ConfigError, match="data.tokenizer.*needs data.tokenizer.path"):
    load_experiment(f"{OWN_DATA}:tiny", base + ["--config.data.tokenizer.kind=sentencepiece"])
  with pytest.raises(ConfigError, match="not found"):
    load_experiment(f"{OWN_DATA}:tiny", base + ["--config.data.tokenizer.kind=hf",
                                                f"--config.data.tokenizer.path={tmp_path / 'none.json'}"])


def test_tokenizer_train_reports_a_bad_manifest(tmp_path, capsys):
  assert cli.main(["tokenizer", "train", "--manifest", str(tmp_path / "no.jsonl"), "--vocab-size", "50",
                   "--out", str(tmp_path / "x.model")]) == 2
  assert "no.jsonl" in capsys.readouterr().err and not (tmp_path / "x.model").exists()


def test_hf_tokenizer_json_shifts_ids_so_zero_pads(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  bpe = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=120, special_tokens=["<s>", "</s>", "<unk>"],
                                           initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  bpe.train_from_iterator(["a handwritten seven", "the digit three, written by hand"] * 20, trainer)
  path = tmp_path / "tokenizer.json"
  bpe.save(str(path))
  tok = HFTokenizer(str(path), 24)
  assert tok.offset == 1 and tok.vocab_size == bpe.get_vocab_size() + 1  # <s> is id 0 there: ids shift by one
  assert (tok.bos_id, tok.eos_id) == (bpe.token_to_id("<s>") + 1, bpe.token_to_id("</s>") + 1)
  ids = tok.encode("the digit seven", add_bos=True, add_eos=True)
  assert ids[0] == tok.bos_id and 0 not in ids[: np.count_nonzero(ids)] and ids.max() < tok.vocab_size
  assert tok.decode(ids) == "the digit seven"
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(tok)).encode("seven"), tok.encode("seven"))
