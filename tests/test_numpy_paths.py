"""fairseq 0.12 code paths that break under NumPy 2 (setup.py pins numpy<2 for them):

- `TokenBlockDataset(break_mode="eos")` uses `np.compat.long`: `--sample-break-mode eos` and the
  hub's `.score()` (LanguageModelingTask.build_dataset_for_inference) die with
  "module 'numpy' has no attribute 'compat'".
- `LanguagePairDataset(num_buckets > 0)` (`--num-batch-buckets`) calls
  `np.percentile(..., interpolation=...)` (data_utils.get_buckets; the keyword is gone in NumPy 2.4)
  and `np.compat.long`.

The first tests build fairseq's datasets on tiny in-memory data (fast); the `slow` ones go through
`fairseq-train` on the shipped corpora and load the trained LM through the hub interface."""

import math
from argparse import Namespace

import numpy as np
import pytest
import torch
from fairseq.data import Dictionary, LanguagePairDataset, TokenBlockDataset

from conftest import json_logs

WORDS = "the cat sat on a mat and then it ran off to see what the dog did next".split()


def test_numpy_is_below_2():
    """The install constraint itself (setup.py: numpy<2); the tests below show why."""
    assert int(np.__version__.split(".")[0]) < 2, f"numpy {np.__version__}: fairseq 0.12 needs numpy<2"


def _dictionary():
    d = Dictionary()
    for w in WORDS:
        d.add_symbol(w)
    d.finalize(padding_factor=1)
    return d


def _sentences(d, lengths, offset=0):
    """Sentences of the given lengths (eos included), made of distinct words so items are recognisable."""
    out = []
    for i, n in enumerate(lengths):
        words = [WORDS[(offset + i + j) % len(WORDS)] for j in range(n - 1)]
        out.append(d.encode_line(" ".join(words), add_if_not_exist=False, append_eos=True).long())
    return out


@pytest.mark.parametrize("block_size", [None, 3])
def test_token_block_dataset_eos_break_mode(block_size):
    """--sample-break-mode eos: one block per sentence, whatever the block size."""
    d = _dictionary()
    lengths = [4, 1, 7, 2, 5]
    sents = _sentences(d, lengths)
    ds = TokenBlockDataset(sents, [len(s) for s in sents], block_size=block_size, pad=d.pad(), eos=d.eos(),
                           break_mode="eos", include_targets=True)
    assert len(ds) == len(sents)
    assert list(ds.sizes) == lengths
    for i, sent in enumerate(sents):
        source, item, past_target = ds[i]
        assert torch.equal(item, sent)
        assert item[-1].item() == d.eos()
        # source is the sentence shifted right by one (eos first), past_target by two (pad, eos first)
        assert source.tolist() == [d.eos()] + sent[:-1].tolist()
        assert past_target.tolist() == [d.pad(), d.eos()] + sent[:-2].tolist()


def test_language_model_inference_dataset_used_by_hub_score():
    """What `TransformerLanguageModel.from_pretrained(...).score(...)` builds for its batches."""
    from fairseq.tasks.language_modeling import LanguageModelingTask

    d = _dictionary()
    task = LanguageModelingTask(Namespace(add_bos_token=False, seed=1), d)
    sents = _sentences(d, [3, 6, 4])
    ds = task.build_dataset_for_inference(sents, [len(s) for s in sents])
    assert len(ds) == 3
    batch = ds.collater([ds[i] for i in range(len(ds))])
    src, tgt = batch["net_input"]["src_tokens"], batch["target"]
    # eos is stripped from the target and prepended to the source; the target ends in pad
    assert src.shape == tgt.shape == (3, 6)
    assert batch["net_input"]["src_lengths"].tolist() == [3, 6, 4]
    for row, sent in enumerate(sents):
        n = len(sent)
        assert src[row, 0].item() == d.eos()
        assert src[row, 1:n].tolist() == sent[:-1].tolist()
        assert tgt[row, : n - 1].tolist() == sent[:-1].tolist()
        assert (tgt[row, n - 1:] == d.pad()).all()


def test_language_pair_dataset_num_buckets():
    """--num-batch-buckets: items are padded to their bucket's length and batches have fixed shapes."""
    d = _dictionary()
    src_lengths = [3, 4, 5, 6, 7, 8, 9, 10]
    tgt_lengths = [2, 9, 4, 3, 8, 5, 6, 7]
    src, tgt = _sentences(d, src_lengths), _sentences(d, tgt_lengths, offset=5)
    ds = LanguagePairDataset(src, src_lengths, d, tgt, tgt_lengths, d, num_buckets=2, shuffle=False,
                             left_pad_source=True, left_pad_target=False)

    src_buckets, tgt_buckets = list(ds.src.buckets), list(ds.tgt.buckets)
    assert src_buckets == [6, 10] and tgt_buckets == [5, 9]
    assert list(ds.src_sizes) == [6, 6, 6, 6, 10, 10, 10, 10]
    assert list(ds.tgt_sizes) == [5, 9, 5, 5, 9, 5, 9, 9]
    assert ds.buckets == [(None, n) for n in sorted(set(ds.bucketed_num_tokens.tolist()))]
    assert ds.bucketed_num_tokens.tolist() == [max(a, b) for a, b in zip(ds.src_sizes, ds.tgt_sizes)]

    for i in range(len(ds)):
        item = ds[i]
        s, t = item["source"], item["target"]
        assert len(s) == ds.src_sizes[i] and len(t) == ds.tgt_sizes[i]
        # source is left-padded, target right-padded, the sentence itself untouched
        assert s[len(s) - src_lengths[i]:].tolist() == src[i].tolist()
        assert (s[: len(s) - src_lengths[i]] == d.pad()).all()
        assert t[: tgt_lengths[i]].tolist() == tgt[i].tolist()
        assert (t[tgt_lengths[i]:] == d.pad()).all()

    batches = ds.batch_by_size(ds.ordered_indices(), max_tokens=40)
    assert sorted(i for b in batches for i in b) == list(range(len(ds)))
    for b in batches:
        batch = ds.collater([ds[i] for i in b])
        assert batch["net_input"]["src_tokens"].shape == (len(b), max(ds.src_sizes[i] for i in b))
        assert batch["target"].shape == (len(b), max(ds.tgt_sizes[i] for i in b))


@pytest.mark.slow
def test_lm_sample_break_mode_eos_and_hub_score(lm_data, tiny_lm_checkpoint):
    """fairseq-train --sample-break-mode eos (tiny_lm_checkpoint), then the trained LM through the hub
    interface: .score()."""
    save, proc = tiny_lm_checkpoint
    rows = json_logs(proc)
    assert [r["num_updates"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert (save / "checkpoint_last.pt").exists()

    import fairseq_evomoe  # noqa: F401  (registers the MoE LM; allowlists fairseq's checkpoint types)
    from fairseq.models.transformer_lm import TransformerLanguageModel

    lm = TransformerLanguageModel.from_pretrained(str(save), "checkpoint_last.pt", data_name_or_path=str(lm_data))
    lm.eval()
    sentence = "the cat sat on the mat"
    out = lm.score(sentence)
    scores = out["positional_scores"]
    # one score per word: the inference dataset strips the eos from the target and prepends it to the input
    assert scores.shape == (len(sentence.split()),)
    assert torch.isfinite(scores).all() and (scores <= 0).all()
    batch = lm.score(["the cat", "on the mat and the dog"])
    assert [len(o["positional_scores"]) for o in batch] == [2, 6]
    assert all(torch.isfinite(o["positional_scores"]).all() for o in batch)


@pytest.mark.slow
def test_translation_num_batch_buckets(tiny_mt_checkpoint):
    """fairseq-train --num-batch-buckets 2 (tiny_mt_checkpoint) buckets both sides and trains."""
    proc = tiny_mt_checkpoint[1]
    text = proc.stdout + proc.stderr
    assert "bucketing source lengths" in text and "bucketing target lengths" in text
    rows = json_logs(proc)
    assert [r["num_updates"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_numpy_values_in_a_checkpoint_load_whichever_numpy_pickled_them(tmp_path):
    """A checkpoint's numpy values (the best validation loss, --eval-bleu's n-gram counts) load under
    torch's weights_only default whether numpy 1 (numpy.core.multiarray) or numpy 2
    (numpy._core.multiarray) pickled them."""
    import zipfile

    import fairseq_evomoe  # noqa: F401  (allowlists fairseq's checkpoint types)

    saved = tmp_path / "saved.pt"
    torch.save({"best_loss": np.float64(4.25), "counts": np.arange(4)}, saved)
    for module in (b"numpy.core.multiarray", b"numpy._core.multiarray"):
        renamed = tmp_path / f"{module.decode()}.pt"
        with zipfile.ZipFile(saved) as src, zipfile.ZipFile(renamed, "w") as dst:
            for item in src.infolist():
                data = src.read(item)
                if item.filename.endswith("data.pkl"):  # protocol 2: GLOBAL "module\nname\n"
                    data = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
                    data = data.replace(b"numpy.core.multiarray\n", module + b"\n")
                    assert module + b"\nscalar\n" in data and module + b"\n_reconstruct\n" in data
                dst.writestr(item, data)
        state = torch.load(renamed)
        assert state["best_loss"] == 4.25 and state["counts"].tolist() == [0, 1, 2, 3]
