"""The times routelens accepts, wherever one comes in: event times at ingest,
windows in the read API, the command line and the dashboard's URL.

From 1970 to the end of year 9999: reads, exports and the dashboard show
times as dates, and Python's datetime ends there (a UUIDv7's 48 bits of
milliseconds would reach year 10889, and such events could be stored but
not read). Events lie before `END`; a window [since, until) ends there at
the latest, so that every event accepted lies in a window one can ask for.
"""

from __future__ import annotations

from datetime import datetime, timezone

END = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc).timestamp()
