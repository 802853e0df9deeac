"""rundir.progress_bar: whole lines (no carriage returns) when stderr is not a terminal, throttled to
the interval but always with the first and the last count; silent off rank 0."""
import rundir


def test_lines_in_a_log(capsys):
    for _ in rundir.progress_bar(range(5), desc="steps", mininterval=0):
        pass
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 6 and lines[0].startswith("steps:") and "0/5" in lines[0]
    assert "5/5" in lines[-1]


def test_interval_and_postfix_are_throttled(capsys):
    bar = rundir.progress_bar(total=100, desc="train", mininterval=3600)
    for i in range(100):
        bar.update(1)
        bar.set_postfix(loss=1 / (i + 1))  # tqdm refreshes on every set_postfix; the log must not
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and "0/100" in lines[0] and "100/100" in lines[1] and "loss=0.01" in lines[1]


def test_quiet_off_rank_zero(capsys, monkeypatch):
    for _ in rundir.progress_bar(range(3), desc="x", master=False):
        pass
    monkeypatch.setenv("RANK", "1")  # torchrun's variable
    for _ in rundir.progress_bar(range(3), desc="y"):
        pass
    assert capsys.readouterr().err == ""
