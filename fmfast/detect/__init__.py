"""Detection on recordings: a trained model as a window scorer (``scorer``), the window engine
that scores frames and current as they arrive (``windows``), where they come from (``sources``
offline, ``follow`` for a live recording), alarms with hysteresis (``alarms``) and what is
written (``report``: CSV, timeline, overlays).

May import: ``fmfast.data``, ``fmfast.models``, ``fmfast.engine``, ``fmfast.errors``,
``fmfast.files``, ``fmfast.progress``. Not cli/.
"""
from fmfast.detect.alarms import Alarm, AlarmTracker, alarm_intervals
from fmfast.detect.scorer import Scorer
from fmfast.detect.sources import feed_file, feed_v2
from fmfast.detect.windows import Results, WindowEngine

__all__ = ["Alarm", "AlarmTracker", "Results", "Scorer", "WindowEngine", "alarm_intervals", "feed_file", "feed_v2"]
