"""The console line: the watched metrics, aligned under the header, blank where absent."""

from vlm_rl.training.console import COLUMNS, header, metrics_line, samples_table


def test_metrics_line_is_aligned_under_the_header():
    logs = {"step": 3, "episode": 24, "objective/scores": 0.5, "objective/kl": 0.0123, "eps": 55.25, "loss/policy_avg": 9.0}
    line, head = metrics_line(logs), header()
    assert len(line) == len(head)
    for title, name, _ in COLUMNS:
        end = head.index(title) + len(title)  # right-aligned: each value ends where its title ends
        cell = line[: end].rsplit("  ", 1)[-1].strip()
        assert cell == ({"step": "3", "episode": "24", "objective/scores": "0.500", "objective/kl": "0.012", "eps": "55.2"}.get(name, ""))
    assert "9.0" not in line  # not a watched metric


def test_samples_table_cuts_long_texts():
    table = samples_table(7, [("a" * 100, "short", 1.0)], width=20)
    assert "a" * 17 + "..." in table and "+1.000" in table and "iteration 7" in table


def test_samples_table_leaves_an_unscored_sample_without_score():
    table = samples_table(1, [("p", "scored", -1.0), ("p", "unscored", None)])
    scored, unscored = table.splitlines()[-2:]
    assert scored.endswith("-1.000") and unscored.rstrip().endswith("unscored") and len(unscored) == len(scored)
