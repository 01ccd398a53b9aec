"""The data options every run that reads data shares (PPO, SFT, train-reward): `--column_map`, `--skip_bad_rows`,
`--max_bad_row_fraction`."""

from __future__ import annotations

from dataclasses import dataclass, field

from vlm_rl.data.readers import column_map_option
from vlm_rl.errors import ConfigError


@dataclass
class DataOptions:
    """A config mixin; its owner calls `check_data_options()` in `__post_init__`."""

    column_map: str | None = field(
        default=None,
        metadata={"help": "Rename data columns first: SOURCE=TARGET,... (e.g. question=prompt,img=image; a mapping in YAML)."},
    )
    skip_bad_rows: bool = field(
        default=False,
        metadata={"help": "Skip rows that fail the data check (each named in output_dir/skipped_rows.jsonl) instead of stopping."},
    )
    max_bad_row_fraction: float = field(
        default=0.1, metadata={"help": "With skip_bad_rows: stop anyway when more than this fraction of the rows is bad."}
    )

    def check_data_options(self) -> None:
        """`column_map` (a string, or a mapping from YAML) checked and written as "SOURCE=TARGET,..."; the fraction in [0, 1]."""
        self.column_map = column_map_option(self.column_map)
        if not 0 <= self.max_bad_row_fraction <= 1:
            raise ConfigError(f"max_bad_row_fraction must be in [0, 1], got {self.max_bad_row_fraction}")
