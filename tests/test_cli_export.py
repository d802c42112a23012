"""`qnkit export`'s progress: on a terminal a spinner shows the step it is on and the time so far; off a
terminal only the steps' lines are printed (no live display, no stray empty line)."""
import io


def test_export_shows_its_step_and_time_on_a_terminal_and_only_lines_in_a_file():
    from rich.console import Console

    from qnkit.commands.export import export_progress

    steps = ["exporting model.onnx (64x64 grid, dynamic batch/height/width)...", "verify model.onnx: ok [fp32]"]
    terminal = Console(file=io.StringIO(), force_terminal=True, width=100)
    with export_progress(terminal, first="loading torch and the checkpoint") as log:
        for step in steps:
            log(step)
    shown = terminal.file.getvalue()
    assert all(step in shown for step in steps) and "0:00:0" in shown  # the live line: step and elapsed time
    assert "loading torch and the checkpoint" in shown  # the spinner's text before the first step
    for enabled in (True, False):
        plain = Console(file=io.StringIO(), force_terminal=False, width=100)
        with export_progress(plain, enabled, first="loading torch and the checkpoint") as log:
            for step in steps:
                log(step)
        assert plain.file.getvalue() == "".join(f"{step}\n" for step in steps)  # the first text is never a line
