"""The LLP evaluation files (``crabplus.data.llp``) read as the authors' AVVP evaluation reads them."""

import logging

import pytest
from crabplus.data.llp import read_llp_labels

HEADER = "filename\tonset\toffset\tevent_labels"  # the column order of the released AVVP_eval_*.csv


def _write(directory, audio_rows, visual_rows):
    for name, rows in (("AVVP_eval_audio.csv", audio_rows), ("AVVP_eval_visual.csv", visual_rows)):
        (directory / name).write_text("\n".join([HEADER, *rows]) + "\n")


def test_rows_with_onset_not_before_offset_are_empty_events(tmp_path, caplog):
    # Rows copied from the released AVVP_eval_audio.csv. main_avvp.py sets ``GT_a[idx, x1:x2] = 1``: an empty slice
    # when x1 >= x2, so such a row marks no segment; the video still belongs to the evaluation.
    audio = [
        "CaC2xvdLC34_250_260\t9\t9\tSpeech",
        "CaC2xvdLC34_250_260\t0\t4\tDog",
        "Gg3pK71kApY_30_40\t10\t10\tSpeech",
        "H5WcJwyjxIg_2_12\t0\t0\tBaby_cry_infant_cry",
        "8DF2PxdT5tE_390_400\t9\t0\tCheering",
    ]
    visual = ["CaC2xvdLC34_250_260\t0\t10\tSpeech", "8DF2PxdT5tE_390_400\t2\t5\tCheering"]
    _write(tmp_path, audio, visual)
    with caplog.at_level(logging.INFO, logger="crabplus.data.llp"):
        labels = read_llp_labels(tmp_path)
    assert labels["CaC2xvdLC34_250_260"].audio_events == (("Dog", 0, 4),)
    assert labels["CaC2xvdLC34_250_260"].visual_events == (("Speech", 0, 10),)
    assert labels["8DF2PxdT5tE_390_400"].audio_events == ()
    assert labels["8DF2PxdT5tE_390_400"].visual_events == (("Cheering", 2, 5),)
    for name in ("Gg3pK71kApY_30_40", "H5WcJwyjxIg_2_12"):
        assert labels[name].audio_events == () and labels[name].visual_events == ()
    said = [r.getMessage() for r in caplog.records if "empty" in r.getMessage()]
    assert len(said) == 1 and "4 rows" in said[0] and "AVVP_eval_audio.csv" in said[0]
    assert "CaC2xvdLC34_250_260" in said[0]  # an example, in the file's own words


@pytest.mark.parametrize("row", ["v\t-1\t4\tDog", "v\t0\t11\tDog", "v\tx\t4\tDog", "v\t0\t4\t", "\t0\t4\tDog"])
def test_malformed_rows_are_refused_naming_the_line(tmp_path, row):
    _write(tmp_path, ["a\t0\t4\tDog", row], [])
    with pytest.raises(ValueError, match=r"AVVP_eval_audio.csv line 3"):
        read_llp_labels(tmp_path)
