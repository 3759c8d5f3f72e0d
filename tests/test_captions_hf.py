"""The captions step's `hf` captioner (`cir.synth.captions.HFCaptioner`), with a tiny BLIP
built in code (tests/tiny_blip.py) that says one known caption for any image: so a test
can check exactly what the step writes, row by row, in the synth job as in its callable."""
from __future__ import annotations

import re
import shutil

import pyarrow.parquet as pq
import pytest
import test_generator
from test_generator import synth_config
from tiny_blip import CAPTION, training_images

from cir.generate.quality import FilterConfig
from cir.synth.captions import CaptionsConfig, HFCaptioner
from cir.synth.pipeline import SynthRun

half_captioned_corpus = test_generator.half_captioned_corpus    # the fixture: 80 shapes rows, 40 uncaptioned


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    """A save_pretrained folder of the tiny BLIP (model and processor)."""
    from tiny_blip import build_tiny_blip

    return build_tiny_blip(tmp_path_factory.mktemp("tiny-blip"))


@pytest.fixture
def captioner(tiny_blip):
    """A factory of HFCaptioners over the tiny BLIP in the test process, on one thread as
    in a 1-CPU Ray actor (a model this small runs far slower on more, busy, cores)."""
    import torch

    threads = torch.get_num_threads()

    def make(filter_cfg: FilterConfig | None = None, **cfg) -> HFCaptioner:
        return HFCaptioner(CaptionsConfig(captioner="hf", model=str(tiny_blip), torch_threads=1, **cfg),
                           filter_cfg or FilterConfig())

    yield make
    torch.set_num_threads(threads)       # (HFCaptioner sets it for the whole process)


def hf_settings(corpus, model) -> dict:
    return {"corpus.source": str(corpus), "generate.backend": "template", "captions.captioner": "hf",
            "captions.model": str(model), "captions.batch_size": 16}


def test_blip_takes_the_image_only_branch_and_decodes_without_its_start_token(captioner):
    blip = captioner()
    assert not blip.chat                  # BLIP's processor has no chat template: no prompt
    # generate() starts every caption with BLIP's [DEC] token; decoding must drop it.
    assert blip.captions(training_images(3, seed=7)) == [CAPTION] * 3


def test_only_missing_captions_are_filled_unless_overwrite(captioner, half_captioned_corpus):
    _, source = half_captioned_corpus
    batch = source.slice(0, 4)                                # captioned, missing, captioned, missing
    first, third = batch.column("caption").to_pylist()[::2]

    def captions(filter_cfg=None, **cfg) -> list:
        return captioner(filter_cfg, **cfg)(batch).column("caption").to_pylist()

    assert captions() == [first, CAPTION, third, CAPTION]
    assert captions(overwrite=True) == [CAPTION] * 4
    # A caption the filter refuses (8 words where 9 are needed) stays null.
    assert captions(FilterConfig(min_words=9)) == [first, None, third, None]


def test_captions_step_with_hf_fills_missing_captions_and_resumes(ray_session, tiny_blip, half_captioned_corpus,
                                                                  tmp_path):
    corpus, source = half_captioned_corpus
    out = tmp_path / "synth"
    settings = hf_settings(corpus, tiny_blip)
    summary = SynthRun(synth_config(out, "", **settings)).run()
    assert summary.stages["captions"].extra == {"missing_before": 40, "missing_after": 0, "captioner": "hf"}
    written = pq.read_table(out / "captions").to_pylist()
    assert sorted(r["image_id"] for r in written) == sorted(source.column("image_id").to_pylist())
    by_id = {r["image_id"]: r for r in written}
    for row in source.to_pylist():
        expected = row["caption"] if row["caption"] is not None else CAPTION   # kept, or the model's
        assert by_id[row["image_id"]] == {**row, "caption": expected}
    # Resume: a finished captions stage is reused, not recomputed.
    stamps = {f.name: f.stat().st_mtime_ns for f in (out / "captions").iterdir()}
    shutil.rmtree(out / "triplets")
    again = SynthRun(synth_config(out, "", **settings)).run()
    assert [n for n, r in again.stages.items() if not r.skipped] == ["triplets"]
    assert {f.name: f.stat().st_mtime_ns for f in (out / "captions").iterdir()} == stamps


def test_a_missing_model_folder_is_refused_before_any_work(half_captioned_corpus, tmp_path):
    corpus, _ = half_captioned_corpus
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=re.escape(f"captions.model: {tmp_path / 'no-such-blip'} is not a folder")):
        SynthRun(synth_config(out, "", **hf_settings(corpus, tmp_path / "no-such-blip")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        SynthRun(synth_config(out, "", **hf_settings(corpus, tmp_path / "empty")))
    assert not out.exists()


def test_captions_settings_are_checked():
    CaptionsConfig(captioner="hf", model="Salesforce/blip-image-captioning-base").validate()  # a hub id: fine
    with pytest.raises(ValueError, match="captions.dtype"):
        CaptionsConfig(captioner="hf", model="Salesforce/blip-image-captioning-base", dtype="half").validate()
