"""A model whose own code was written for transformers 4 fails with one `error:` line, never a traceback.

The replicas break the way ChatGLM3's and Qwen-1's code does under transformers 5: a tokenizer whose `_pad`
lacks `padding_side` (ChatGLM3: every tokenize call raises), a model that calls the removed `get_head_mask`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import params_with
from workflow import cli, preprocess
from workflow.errors import StepError
from workflow.modeling import load_base, load_tokenizer
from workflow.precision import resolve_precision
from workflow.remote import own_code

OLD_TOKENIZER = '''from transformers import PreTrainedTokenizer

CHARS = ["<pad>", "</s>"] + [chr(c) for c in range(32, 127)] + ["\\n"]


class OldTokenizer(PreTrainedTokenizer):
    """Characters, with transformers 4's `_pad` signature (no padding_side), as ChatGLM3's tokenizer has."""

    def __init__(self, **kwargs):
        self.vocab = {c: i for i, c in enumerate(CHARS)}
        super().__init__(**kwargs)

    @property
    def vocab_size(self):
        return len(CHARS)

    def get_vocab(self):
        return dict(self.vocab)

    def _tokenize(self, text):
        return [c for c in text if c in self.vocab]

    def _convert_token_to_id(self, token):
        return self.vocab.get(token, 0)

    def _convert_id_to_token(self, index):
        return CHARS[index]

    def _pad(self, encoded_inputs, max_length=None, padding_strategy=None, pad_to_multiple_of=None,
             return_attention_mask=None):
        return encoded_inputs
'''

OLD_MODEL = '''from transformers import LlamaForCausalLM


class OldLlama(LlamaForCausalLM):
    """Calls `get_head_mask`, which transformers 5 removed (Qwen-1's QWenModel does)."""

    def __init__(self, config):
        super().__init__(config)
        self.head_mask = self.get_head_mask(None, config.num_hidden_layers)
'''


@pytest.fixture
def old_code_model(builtin_model_dir, tmp_path) -> Path:
    """The builtin model with an old tokenizer and model class of its own (config.json/tokenizer auto_map)."""
    model = tmp_path / "oldcode"
    shutil.copytree(builtin_model_dir, model, ignore=shutil.ignore_patterns("source.json"))
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_old.OldLlama"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "modeling_old.py").write_text(OLD_MODEL)
    for name in ("tokenizer.json", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)
    (model / "tokenizer_config.json").write_text(json.dumps({
        "auto_map": {"AutoTokenizer": ["tokenization_old.OldTokenizer", None]}, "tokenizer_class": "OldTokenizer",
        "eos_token": "</s>", "pad_token": "<pad>"}))
    (model / "tokenization_old.py").write_text(OLD_TOKENIZER)
    return model


def test_old_tokenizer_code_is_one_clear_error(old_code_model):
    with pytest.raises(StepError) as err:
        load_tokenizer(old_code_model, trust_remote_code=True)
    msg = str(err.value)
    assert str(old_code_model) in msg and "tokenization_old.OldTokenizer" in msg
    assert "TypeError" in msg and "padding_side" in msg  # the missing piece
    assert "trust_remote_code: false" in msg and "\n" not in msg  # what to do, on one line


def test_old_model_code_is_one_clear_error(old_code_model):
    plan = resolve_precision("bf16", "cpu")
    with pytest.raises(StepError, match=r"modeling_old\.OldLlama.*AttributeError.*get_head_mask"):
        load_base(old_code_model, plan, trust_remote_code=True)


def test_preprocess_step_prints_one_error_line(old_code_model, tmp_path, capsys):
    params = params_with(tmp_path, models={"tiny": {"source": str(old_code_model), "trust_remote_code": True}})
    rc = cli.run(preprocess.main, ["--params", str(params), "--model", "tiny", "--model-dir", str(old_code_model),
                                   "--out", str(tmp_path / "data"), "--report", str(tmp_path / "report.json")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert rc == 1 and len(err) == 1 and "padding_side" in err[0], err
    assert not (tmp_path / "data").exists()  # nothing half-written


def test_failures_outside_a_models_own_code_keep_their_traceback(old_code_model):
    with pytest.raises(AttributeError):  # no trusted code in play: a bug, not bad input
        with own_code(old_code_model, False, "model"):
            raise AttributeError("a bug in the project")
