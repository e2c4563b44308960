"""What the dashboard shows, as the page's URL carries it, so that a link reproduces the view.

The query string holds the same parameters as the read API
(`window` or `since`/`until`, `app`, `deployment`, `router_class`, `label`,
`reason`),
plus `refresh` and a view's own (the explorer's page, compare's choices,
the What-if view's replay);
the path names the view. `Filters` come from it through the same
`build_filters` as the API's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple
from urllib.parse import parse_qs, urlencode

from routelens.collector.export.names import DECISION_TABLES
from routelens.collector.query.filters import DEFAULT_WINDOW, FilterError, Filters, build_filters, parse_label
from routelens.collector.store.ids import to_bytes

WINDOWS = ("5m", "15m", "1h", "24h", "7d")
REFRESH_S = {"off": 0, "5s": 5, "30s": 30}
VIEWS = {"overview": "Overview", "distribution": "Distribution", "staleness": "Staleness",
         "rank-hits": "Rank hits", "prefix-affinity": "Prefix affinity", "explorer": "Decisions", "compare": "Compare",
         "whatif": "What-if"}
SHIFTS = {"previous": "the window before", "24h": "24 h earlier", "7d": "7 d earlier"}
DEFAULT_VIEW = "overview"


@dataclass
class ViewState:
    view: str = DEFAULT_VIEW
    window: str = DEFAULT_WINDOW
    # A custom window (epoch seconds or ISO-8601), which the relative `window` then does not set.
    since: Optional[str] = None
    until: Optional[str] = None
    apps: List[str] = field(default_factory=list)
    deployments: List[str] = field(default_factory=list)
    router_classes: List[str] = field(default_factory=list)
    labels: List[str] = field(default_factory=list)  # "key=value"
    reasons: List[str] = field(default_factory=list)  # the routers' reasons (the explorer, Rank hits' reasons)
    refresh: str = "off"
    # The decision explorer's place: a page (the cursor of the API's pagination) and an open decision.
    cursor: Optional[str] = None
    decision: Optional[str] = None
    follow: bool = False  # the explorer follows decisions live (GET /v1/tail)
    # The compare view: two label values ("key=value"), or the window against an earlier one.
    compare_a: Optional[str] = None
    compare_b: Optional[str] = None
    compare_shift: Optional[str] = None
    # The What-if view's replay (its id, as given: the view says what is wrong with one that names none).
    replay: Optional[str] = None

    def with_(self, **changes) -> "ViewState":
        return ViewState(**{**self.__dict__, **changes})

    def href(self, prefix: str) -> str:
        return self.path(prefix) + self.search()

    def filters(self, now: Optional[float] = None) -> Filters:
        return build_filters(self.window, self.since, self.until, self.apps, self.deployments,
                             self.router_classes, self.labels, reason=self.reasons, now=now)

    def search(self) -> str:
        """The query string (with its "?", or empty) for this state."""
        pairs: List[Tuple[str, str]] = []
        if self.window != DEFAULT_WINDOW:
            pairs.append(("window", self.window))
        pairs.extend((key, getattr(self, key)) for key in ("since", "until") if getattr(self, key))
        for key, values in self._filter_values():
            pairs.extend((key, value) for value in values)
        if self.refresh != "off":
            pairs.append(("refresh", self.refresh))
        for key in ("cursor", "decision", "compare_a", "compare_b", "compare_shift", "replay"):
            if getattr(self, key):
                pairs.append((key, getattr(self, key)))
        if self.follow:
            pairs.append(("follow", "1"))
        return "?" + urlencode(pairs) if pairs else ""

    def export_query(self, f: Filters, what: str) -> str:
        """The export endpoint's query string for table `what` as the view shows it: its
        filters, and its window as the absolute times it was computed for. The reason
        filter narrows decisions only: a table of requests is exported whole."""
        return urlencode(self._window_and_filters(f, reason=what in DECISION_TABLES) + [("what", what)])

    def read_query(self, f: Filters) -> str:
        """A read endpoint's query string for what the view shows: every filter, the reason's
        included, and the window as the absolute times it was computed for."""
        return urlencode(self._window_and_filters(f, reason=True))

    def _window_and_filters(self, f: Filters, reason: bool) -> List[Tuple[str, str]]:
        """The window as the absolute times it was computed for, and the filters (`reason`: its too)."""
        pairs = [("since", repr(f.since)), ("until", repr(f.until))]
        for key, values in self._filter_values():
            if key != "reason" or reason:
                pairs.extend((key, value) for value in values)
        return pairs

    def _filter_values(self) -> Tuple[Tuple[str, List[str]], ...]:
        """The filters, as the read API's parameters name them."""
        return (("app", self.apps), ("deployment", self.deployments), ("router_class", self.router_classes),
                ("label", self.labels), ("reason", self.reasons))

    def path(self, prefix: str) -> str:
        return prefix + ("" if self.view == DEFAULT_VIEW else self.view)


def from_url(pathname: Optional[str], search: Optional[str], prefix: str) -> ViewState:
    """The state a URL describes; what it gets wrong falls back to the defaults.
    (The window and filters are checked when the view is drawn, which then
    says what is wrong with them.)"""
    query = parse_qs((search or "").lstrip("?"))
    view = (pathname or prefix)[len(prefix):].strip("/") if (pathname or "").startswith(prefix) else ""
    window = query.get("window", [DEFAULT_WINDOW])[-1]
    refresh = query.get("refresh", ["off"])[-1]
    cursor = query.get("cursor", [None])[-1]
    compare_a, compare_b = query.get("compare_a", [None])[-1], query.get("compare_b", [None])[-1]
    return ViewState(
        view=view if view in VIEWS else DEFAULT_VIEW,
        window=window if window in WINDOWS else DEFAULT_WINDOW,
        since=query.get("since", [None])[-1], until=query.get("until", [None])[-1],
        apps=query.get("app", []), deployments=query.get("deployment", []),
        router_classes=query.get("router_class", []), labels=query.get("label", []),
        reasons=query.get("reason", []),
        refresh=refresh if refresh in REFRESH_S else "off",
        # A page that is no decision id is the newest; compare's sides must be labels (key=value).
        cursor=cursor if cursor and _is_decision_id(cursor) else None, decision=query.get("decision", [None])[-1],
        follow=query.get("follow", [""])[-1] == "1",
        compare_a=compare_a if compare_a and _is_label(compare_a) else None,
        compare_b=compare_b if compare_b and _is_label(compare_b) else None,
        compare_shift=query.get("compare_shift", [None])[-1] if query.get("compare_shift", [None])[-1] in SHIFTS
        else None,
        replay=query.get("replay", [None])[-1],
    )


def _is_decision_id(value: str) -> bool:
    try:
        to_bytes(value)
    except ValueError:
        return False
    return True


def _is_label(value: str) -> bool:
    try:
        parse_label(value)
    except FilterError:
        return False
    return True
