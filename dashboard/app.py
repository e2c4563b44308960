"""The dashboard: a Dash app on the collector's query layer.

`create_dashboard(engine, prefix)` builds it; `routelens up` serves it at
`/` beside the collector's API (see `dashboard.up`). The page's URL
carries the view and the filters (`dashboard.state`): one callback keeps the
controls and the URL in step, both ways, and another renders the view from
them, again on every auto-refresh tick.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Dict

from dash import Dash, Input, Output, State, ctx, dcc, html, no_update
from sqlalchemy.engine import Connection, Engine

from routelens.collector.query import figures
from routelens.collector.query.explore import iso
from routelens.collector.query.filters import DEFAULT_WINDOW, FilterError, Filters

from .callback_requests import refuse_malformed_callbacks
from .state import REFRESH_S, VIEWS, WINDOWS, ViewState, from_url
from .views import compare, distribution, explorer, overview, prefix_affinity, rank_hits, staleness, whatif

_CSS = """
body { font-family: system-ui, sans-serif; margin: 0; background: #f6f7f9; color: #1d2430; }
header { background: #1d2430; color: white; padding: 10px 20px; display: flex; gap: 24px; align-items: center; }
header h1 { font-size: 18px; margin: 0; }
header a { color: #c9d3e3; text-decoration: none; } header a.active { color: white; font-weight: 600; }
.controls { display: flex; gap: 12px; padding: 10px 20px; flex-wrap: wrap; align-items: center; }
.controls > div { min-width: 180px; }
main { padding: 0 20px 20px; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 10px 0; }
.card { background: white; border-radius: 6px; padding: 10px 14px; min-width: 150px; box-shadow: 0 1px 2px #0002; }
.card.alert { background: #fff0ee; border: 1px solid #e2574c; }
.card-label { font-size: 12px; color: #5b6578; } .card-value { font-size: 22px; font-weight: 600; }
.card-note { font-size: 11px; color: #5b6578; max-width: 220px; }
.panel { background: white; border-radius: 6px; padding: 10px 14px; margin: 10px 0; box-shadow: 0 1px 2px #0002; }
.panel h3 { margin: 0 0 6px; font-size: 14px; }
table.figures { border-collapse: collapse; font-size: 13px; } table.figures td, table.figures th { padding: 3px 10px;
  border-bottom: 1px solid #e6e8ec; text-align: right; }
table.figures td:first-child, table.figures th:first-child { text-align: left; }
.panel a.active { font-weight: 700; text-decoration: underline; }
.panel p.note { font-size: 12px; color: #5b6578; }
.empty { background: white; padding: 20px; border-radius: 6px; max-width: 820px; }
.empty pre { background: #f0f2f5; padding: 10px; }
"""

_EMPTY_HELP = '''from ray.serve.config import RequestRouterConfig
from routelens.routers.examples import TracedPowerOfTwoChoicesRequestRouter   # or: class Traced(TracingMixin, YourRouter): pass

@serve.deployment(request_router_config=RequestRouterConfig(
    request_router_class=TracedPowerOfTwoChoicesRequestRouter,
    request_router_kwargs={{"collector_url": "{url}"}},
))
class MyDeployment: ...'''


def create_dashboard(engine: Engine, prefix: str = "/") -> Dash:
    app = Dash(__name__, requests_pathname_prefix=prefix, routes_pathname_prefix=prefix, title="routelens",
               update_title=None, suppress_callback_exceptions=True)
    app.index_string = app.index_string.replace("{%css%}", "{%css%}<style>" + _CSS + "</style>").replace(
        "{%scripts%}", "{%scripts%}<script>" + explorer.LIVE_SCRIPT + "</script>")
    app.layout = _layout(prefix)
    refuse_malformed_callbacks(app, prefix)
    # Each view: (connection, filters, the whole state) -> its content.
    renderers: Dict[str, Callable[[Connection, Filters, ViewState], html.Div]] = {
        "overview": overview.render,
        "distribution": partial(distribution.render, prefix=prefix),
        "staleness": staleness.render,
        "rank-hits": partial(rank_hits.render, prefix=prefix),
        "prefix-affinity": partial(prefix_affinity.render, prefix=prefix),
        "explorer": partial(explorer.render, prefix=prefix),
        "compare": partial(compare.render, prefix=prefix),
        "whatif": partial(whatif.render, prefix=prefix),
    }

    @app.callback(
        Output("window", "value"), Output("app", "value"), Output("deployment", "value"),
        Output("router_class", "value"), Output("label", "value"), Output("reason", "value"),
        Output("refresh", "value"), Output("url", "search"),
        Output("app", "options"), Output("deployment", "options"), Output("router_class", "options"),
        Output("label", "options"), Output("reason", "options"),
        Input("url", "search"), Input("window", "value"), Input("app", "value"), Input("deployment", "value"),
        Input("router_class", "value"), Input("label", "value"), Input("reason", "value"), Input("refresh", "value"),
        Input("tick", "n_intervals"), State("url", "pathname"),
    )
    def sync_controls(search, window, apps, deployments, router_classes, labels, reasons, refresh, _tick,
                      pathname):
        """The URL changed (page load, back button): it sets the controls. A
        control changed: the URL follows. Either way, and on each refresh, the
        filters' choices are what the database knows, plus what is chosen (a
        dropdown drops a value it has no option for)."""
        # What the URL holds besides the controls (the view, the compare choices) is kept; a page of
        # decisions or an open one is not, under other filters.
        from_controls = from_url(pathname, search, prefix).with_(
            window=window or DEFAULT_WINDOW, apps=apps or [], deployments=deployments or [],
            router_classes=router_classes or [], labels=labels or [], reasons=reasons or [], refresh=refresh,
            cursor=None, decision=None)
        if ctx.triggered_id == "window":  # a window chosen from the list replaces a custom one
            from_controls = from_controls.with_(since=None, until=None)
        if ctx.triggered_id in (None, "url"):
            state = from_url(pathname, search, prefix)
            # A custom window leaves the list empty (its placeholder says "custom").
            window_choice = None if state.since or state.until else state.window
            values = (window_choice, state.apps, state.deployments, state.router_classes, state.labels,
                      state.reasons, state.refresh, no_update)
        elif ctx.triggered_id == "tick":
            state, values = from_controls, (no_update,) * 8
        else:
            state = from_controls
            values = (no_update,) * 7 + (state.search(),)
        return values + _choices(engine, state)

    @app.callback(Output("tick", "interval"), Output("tick", "disabled"), Input("refresh", "value"))
    def auto_refresh(refresh):
        seconds = REFRESH_S.get(refresh, 0)
        return max(seconds, 1) * 1000, seconds == 0

    @app.callback(
        Output("view", "children"), Output("nav", "children"), Output("custom-window", "children"),
        Input("url", "pathname"), Input("url", "search"), Input("tick", "n_intervals"),
    )
    def render(pathname, search, _tick):
        state = from_url(pathname, search, prefix)
        nav = [dcc.Link(title, href=state.with_(view=view, cursor=None, decision=None).href(prefix),
                        className="active" if view == state.view else "", id=f"nav-{view}")
               for view, title in VIEWS.items()]
        try:
            f = state.filters()
        except FilterError as exc:
            return html.Div(str(exc), className="empty"), nav, ""
        custom = f"custom window: {iso(f.since)} to {iso(f.until)}" if state.since or state.until else ""
        with engine.connect() as conn:
            # What-if shows stored replays, which outlive the window's records: it has an empty state of its own.
            if state.view != "whatif" and not figures.any_router(conn):
                return _empty(), nav, custom
            return renderers[state.view](conn, f, state), nav, custom

    return app


def _choices(engine: Engine, state: ViewState) -> tuple:
    """Options of the app, deployment, router, label and reason filters."""
    with engine.connect() as conn:
        catalogue = figures.deployments(conn)
        reasons = figures.known_reasons(conn)
    routers = [r for d in catalogue["deployments"] for r in d["routers"]]
    known = (catalogue["apps"], [d["deployment"] for d in catalogue["deployments"]],
             [r["router_class"] for r in routers],
             [f"{k}={v}" for k, values in catalogue["labels"].items() for v in values], reasons)
    chosen = (state.apps, state.deployments, state.router_classes, state.labels, state.reasons)
    return tuple(sorted(set(k) | set(c)) for k, c in zip(known, chosen))


def _layout(prefix: str) -> html.Div:
    def dropdown(control_id: str, placeholder: str) -> html.Div:
        return html.Div(dcc.Dropdown(id=control_id, multi=True, placeholder=placeholder, options=[]))

    return html.Div([
        dcc.Location(id="url", refresh=False),
        dcc.Interval(id="tick", disabled=True),
        html.Header([html.H1("routelens"), html.Nav(id="nav", style={"display": "flex", "gap": "16px"})]),
        html.Div(className="controls", children=[
            html.Div(dcc.Dropdown(id="window", options=list(WINDOWS), clearable=False, placeholder="custom")),
            dropdown("app", "all apps"), dropdown("deployment", "all deployments"),
            dropdown("router_class", "all routers"), dropdown("label", "all labels"),
            dropdown("reason", "all reasons"),
            html.Span(id="custom-window"),
            html.Div(dcc.RadioItems(id="refresh", options=list(REFRESH_S), inline=True), title="auto-refresh"),
        ]),
        html.Main(dcc.Loading(html.Div(id="view"), delay_show=500)),
    ])


def _empty() -> html.Div:
    return html.Div(className="empty", id="empty-state", children=[
        html.H2("No routing decisions yet"),
        html.P("Wrap your router in one line and point it at this collector; decisions show here within seconds."),
        html.Pre(_EMPTY_HELP.format(url="http://<this host>:<this port>")),
        html.P(["Or set ", html.Code("ROUTELENS_COLLECTOR_URL"), " in the cluster's runtime_env. ",
                "The routers package must be installed wherever routers run (proxies, replicas, driver)."]),
    ])
