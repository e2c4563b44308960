"""routelens dashboard: a Dash app over the collector's queries (`app`),
served beside the collector's API by `routelens up` (`up`); its views in
`views/`, the view's state as the URL carries it in `state`."""
