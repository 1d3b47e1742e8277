"""TensorBoard event files in `run_dir/tensorboard` (rank 0). Tags are `<group>/<key>` (train/loss,
perf/mfu, time/time_forward_s, sys/rss_gb, ...), the x axis the optimizer step. A run resumed from step k
purges events after k, so a crash between a log and a checkpoint leaves no doubled curve; a rollback
within a run (a step logged again) does the same from that step on."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from megaseek.monitor.schema import NOT_SCALARS, numeric, tag


class TensorBoardSink:
    def __init__(self, log_dir: Path, start_step: int = 0, flush_secs: int = 10, config_text: Optional[str] = None):
        from torch.utils.tensorboard import SummaryWriter
        self.log_dir, self.last_step = Path(log_dir), start_step
        self.writer = SummaryWriter(str(self.log_dir), purge_step=start_step + 1 if start_step > 0 else None,
                                    flush_secs=int(flush_secs))
        if config_text and start_step == 0:
            self.writer.add_text("config", "```\n" + config_text + "\n```", 0)

    def write(self, record: dict) -> None:
        """One event per record holding every scalar (add_scalar would queue one event per key)."""
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.compat.proto.summary_pb2 import Summary
        step, fw = int(record["step"]), self.writer._get_file_writer()
        if step <= self.last_step:  # a rollback: readers drop the events from this step on (as a restart)
            fw.add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))
        self.last_step = step
        values = [Summary.Value(tag=tag(k), simple_value=x)
                  for k, x in ((k, numeric(v)) for k, v in record.items()) if x is not None and k not in NOT_SCALARS]
        fw.add_summary(Summary(value=values), step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
