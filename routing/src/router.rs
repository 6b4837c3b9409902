//! Routing, as Channels 1.x did it: a flat list of routes, each `route(channel, consumer)` with
//! optional regex filters on message fields (`path`, `method`, or any string field), matched like
//! Python's `re.match` (anchored at the start). Named captures become the consumer's kwargs;
//! `include(routes).path(prefix)` strips the matched prefix before the inner routes see the field.
//! Patterns are compiled once when the [`Router`] is built; a positional group or an invalid regex
//! is an error naming the route. The router also says which channels a worker must listen on.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use regex::Regex;
use thiserror::Error;

use crate::consumer::{Handler, Kwargs};
use crate::durable::DurablePolicy;
use crate::message::Message;
use crate::names;

/// A route that cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum RouteError {
    /// The pattern does not compile.
    #[error("{route}: invalid regex for {field:?}: {reason}")]
    InvalidRegex {
        /// The route, described.
        route: String,
        /// The filtered field.
        field: String,
        /// What the regex compiler said.
        reason: String,
    },
    /// The pattern has unnamed groups (only named captures can become kwargs; use `(?:…)`).
    #[error(
        "{route}: pattern {pattern:?} for {field:?} has positional groups; name them (?P<name>…) or make them non-capturing (?:…)"
    )]
    PositionalGroup {
        /// The route, described.
        route: String,
        /// The filtered field.
        field: String,
        /// The pattern.
        pattern: String,
    },
    /// The channel name is invalid.
    #[error("{route}: {reason}")]
    InvalidChannel {
        /// The route, described.
        route: String,
        /// Why.
        reason: String,
    },
    /// An include with no routes in it.
    #[error("{route}: include() of no routes")]
    EmptyInclude {
        /// The route, described.
        route: String,
    },
}

#[derive(Clone)]
enum Target {
    Handler(Arc<dyn Handler>),
    Include(Vec<Route>),
}

/// How a route handles a message besides calling its consumer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouteOptions {
    /// Run the connection's messages strictly in `order`, across workers.
    pub strict_ordering: bool,
    /// Load the channel session before the consumer runs.
    pub channel_session: bool,
    /// Load the web (Django) session of the connection before the consumer runs.
    pub http_session: bool,
    /// The channel is durable (at-least-once, retried, dead-lettered) with this policy.
    pub durable: Option<DurablePolicy>,
}

impl RouteOptions {
    fn merge(self, outer: RouteOptions) -> RouteOptions {
        RouteOptions {
            strict_ordering: self.strict_ordering || outer.strict_ordering,
            channel_session: self.channel_session || outer.channel_session,
            http_session: self.http_session || outer.http_session,
            durable: self.durable.or(outer.durable),
        }
    }
}

/// One route, built with [`route`], [`route_class`](crate::route_class) or [`include`].
#[derive(Clone)]
pub struct Route {
    channels: Vec<String>,
    filters: Vec<(String, String)>,
    target: Target,
    options: RouteOptions,
    name: String,
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Routes `channel` to a consumer.
pub fn route(channel: &str, handler: impl Handler) -> Route {
    Route {
        channels: vec![channel.to_owned()],
        filters: Vec::new(),
        target: Target::Handler(Arc::new(handler)),
        options: RouteOptions::default(),
        name: String::new(),
    }
}

/// Routes several channels to one type-erased handler (used by class-style consumers).
pub fn route_channels(channels: &[&str], handler: Arc<dyn Handler>) -> Route {
    Route {
        channels: channels.iter().map(|c| (*c).to_owned()).collect(),
        filters: Vec::new(),
        target: Target::Handler(handler),
        options: RouteOptions::default(),
        name: String::new(),
    }
}

/// Groups routes under common filters; a filter's matched prefix is stripped from the field
/// before the inner routes see it.
pub fn include(routes: impl IntoIterator<Item = Route>) -> Route {
    Route {
        channels: Vec::new(),
        filters: Vec::new(),
        target: Target::Include(routes.into_iter().collect()),
        options: RouteOptions::default(),
        name: String::new(),
    }
}

impl Route {
    /// Adds a filter: `field` must match `pattern` from its start (Python `re.match`).
    pub fn filter(mut self, field: &str, pattern: &str) -> Self {
        self.filters.push((field.to_owned(), pattern.to_owned()));
        self
    }

    /// Filter on `path`.
    pub fn path(self, pattern: &str) -> Self {
        self.filter("path", pattern)
    }

    /// Filter on `method`.
    pub fn method(self, pattern: &str) -> Self {
        self.filter("method", pattern)
    }

    /// Run this route's messages strictly in each connection's `order`, across workers.
    pub fn strict_ordering(mut self) -> Self {
        self.options.strict_ordering = true;
        self
    }

    /// Load the channel session before the consumer runs.
    pub fn channel_session(mut self) -> Self {
        self.options.channel_session = true;
        self
    }

    /// Load the connection's web (Django) session before the consumer runs.
    pub fn http_session(mut self) -> Self {
        self.options.http_session = true;
        self
    }

    /// Makes this route's channels durable: each message is kept in a Redis stream until its
    /// consumer succeeded, retried with backoff on failure, and dead-lettered after
    /// `policy.max_attempts` runs (see `switchyard::jobs`).
    pub fn durable(mut self, policy: DurablePolicy) -> Self {
        self.options.durable = Some(policy);
        self
    }

    /// Sets the options at once (class-style consumers).
    pub fn options(mut self, options: RouteOptions) -> Self {
        self.options = options;
        self
    }

    /// Names the route in errors and logs.
    pub fn named(mut self, name: &str) -> Self {
        self.name = name.to_owned();
        self
    }

    fn describe(&self) -> String {
        if !self.name.is_empty() {
            return format!("route {:?}", self.name);
        }
        let mut s = {
            match &self.target {
                Target::Handler(_) => format!("route({})", self.channels.join("|")),
                Target::Include(inner) => format!("include({} routes)", inner.len()),
            }
        };
        for (field, pattern) in &self.filters {
            s.push_str(&format!(".filter({field:?}, {pattern:?})"));
        }
        s
    }
}

#[derive(Clone)]
struct CompiledRoute {
    filters: Vec<(String, Regex)>,
    target: CompiledTarget,
    options: RouteOptions,
    name: Arc<str>,
}

#[derive(Clone)]
enum CompiledTarget {
    Handler {
        channels: Vec<String>,
        handler: Arc<dyn Handler>,
    },
    Include(Vec<CompiledRoute>),
}

fn compile(route: &Route, errors: &mut Vec<RouteError>) -> Option<CompiledRoute> {
    let name = route.describe();
    let mut filters = Vec::with_capacity(route.filters.len());
    let mut ok = true;
    for (field, pattern) in &route.filters {
        match Regex::new(&format!("^(?:{pattern})")) {
            Err(e) => {
                // Report the user's pattern, not our anchored wrapper.
                let reason = Regex::new(pattern)
                    .err()
                    .map_or_else(|| e.to_string(), |e| e.to_string());
                errors.push(RouteError::InvalidRegex {
                    route: name.clone(),
                    field: field.clone(),
                    reason,
                });
                ok = false;
            }
            Ok(re) => {
                let named = re.capture_names().flatten().count();
                if re.captures_len() - 1 != named {
                    errors.push(RouteError::PositionalGroup {
                        route: name.clone(),
                        field: field.clone(),
                        pattern: pattern.clone(),
                    });
                    ok = false;
                }
                filters.push((field.clone(), re));
            }
        }
    }
    let target = match &route.target {
        Target::Handler(h) => {
            for c in &route.channels {
                if let Err(e) = names::validate_channel(c) {
                    errors.push(RouteError::InvalidChannel {
                        route: name.clone(),
                        reason: e.to_string(),
                    });
                    ok = false;
                }
            }
            CompiledTarget::Handler {
                channels: route.channels.clone(),
                handler: h.clone(),
            }
        }
        Target::Include(inner) => {
            if inner.is_empty() {
                errors.push(RouteError::EmptyInclude {
                    route: name.clone(),
                });
                ok = false;
            }
            let compiled: Vec<CompiledRoute> = inner
                .iter()
                .filter_map(|r| compile(r, errors))
                .map(|mut r| {
                    r.options = r.options.merge(route.options);
                    r
                })
                .collect();
            CompiledTarget::Include(compiled)
        }
    };
    ok.then(|| CompiledRoute {
        filters,
        target,
        options: route.options,
        name: Arc::from(name.as_str()),
    })
}

/// What [`Router::resolve`] found for a message.
#[derive(Clone)]
pub struct Resolved {
    /// The consumer.
    pub handler: Arc<dyn Handler>,
    /// Named captures of every filter on the way (inner routes win).
    pub kwargs: Kwargs,
    /// The route's options (strict ordering, sessions).
    pub options: RouteOptions,
    /// The route, described (for logs).
    pub route: Arc<str>,
}

impl fmt::Debug for Resolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolved")
            .field("route", &self.route)
            .field("kwargs", &self.kwargs)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// A compiled list of routes; the first that matches a message wins.
#[derive(Clone)]
pub struct Router {
    routes: Vec<CompiledRoute>,
    channels: Vec<String>,
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field("channels", &self.channels)
            .finish_non_exhaustive()
    }
}

fn collect_channels(routes: &[CompiledRoute], out: &mut Vec<String>) {
    for r in routes {
        match &r.target {
            CompiledTarget::Handler { channels, .. } => {
                for c in channels {
                    if !out.contains(c) {
                        out.push(c.clone());
                    }
                }
            }
            CompiledTarget::Include(inner) => collect_channels(inner, out),
        }
    }
}

impl Router {
    /// Compiles the routes. Every bad pattern or channel is reported (the first as the error,
    /// all of them in its message when there are several).
    pub fn new(routes: impl IntoIterator<Item = Route>) -> Result<Router, RouteError> {
        let mut errors = Vec::new();
        let compiled: Vec<CompiledRoute> = routes
            .into_iter()
            .filter_map(|r| compile(&r, &mut errors))
            .collect();
        if let Some(first) = errors.into_iter().next() {
            return Err(first);
        }
        let mut channels = Vec::new();
        collect_channels(&compiled, &mut channels);
        Ok(Router {
            routes: compiled,
            channels,
        })
    }

    /// The channels a worker must listen on, in route order.
    pub fn channels(&self) -> &[String] {
        &self.channels
    }

    /// The channels routes declared durable, each with its policy (the first route's wins).
    pub fn durable_channels(&self) -> Vec<(String, DurablePolicy)> {
        fn collect(routes: &[CompiledRoute], out: &mut Vec<(String, DurablePolicy)>) {
            for r in routes {
                match &r.target {
                    CompiledTarget::Handler { channels, .. } => {
                        if let Some(policy) = r.options.durable {
                            for c in channels {
                                if !out.iter().any(|(known, _)| known == c) {
                                    out.push((c.clone(), policy));
                                }
                            }
                        }
                    }
                    CompiledTarget::Include(inner) => collect(inner, out),
                }
            }
        }
        let mut out = Vec::new();
        collect(&self.routes, &mut out);
        out
    }

    /// True when some route needs strict ordering on `channel`.
    pub fn any_strict(&self) -> bool {
        fn any(routes: &[CompiledRoute]) -> bool {
            routes.iter().any(|r| {
                r.options.strict_ordering
                    || matches!(&r.target, CompiledTarget::Include(inner) if any(inner))
            })
        }
        any(&self.routes)
    }

    /// The consumer for `message` and its kwargs, or `None` when no route matches.
    pub fn resolve(&self, message: &Message) -> Option<Resolved> {
        let mut overrides: HashMap<String, String> = HashMap::new();
        let mut kwargs = Kwargs::new();
        resolve_in(&self.routes, message, &mut overrides, &mut kwargs)
    }
}

fn resolve_in(
    routes: &[CompiledRoute],
    message: &Message,
    overrides: &mut HashMap<String, String>,
    kwargs: &mut Kwargs,
) -> Option<Resolved> {
    for r in routes {
        if let CompiledTarget::Handler { channels, .. } = &r.target
            && !channels.contains(&message.channel)
        {
            continue;
        }
        let mut local_overrides = overrides.clone();
        let mut local_kwargs = kwargs.clone();
        let mut matched = true;
        for (field, re) in &r.filters {
            let value = match local_overrides.get(field) {
                Some(v) => v.clone(),
                None => match message.field_text(field) {
                    Some(v) => v.to_owned(),
                    None => {
                        matched = false;
                        break;
                    }
                },
            };
            let Some(caps) = re.captures(&value) else {
                matched = false;
                break;
            };
            for name in re.capture_names().flatten() {
                if let Some(m) = caps.name(name) {
                    local_kwargs.insert(name.to_owned(), m.as_str().to_owned());
                }
            }
            if matches!(r.target, CompiledTarget::Include(_)) {
                let end = caps.get(0).map_or(0, |m| m.end());
                local_overrides.insert(field.clone(), value[end..].to_owned());
            }
        }
        if !matched {
            continue;
        }
        match &r.target {
            CompiledTarget::Handler { handler, .. } => {
                return Some(Resolved {
                    handler: handler.clone(),
                    kwargs: local_kwargs,
                    options: r.options,
                    route: r.name.clone(),
                });
            }
            CompiledTarget::Include(inner) => {
                if let Some(found) =
                    resolve_in(inner, message, &mut local_overrides, &mut local_kwargs)
                {
                    return Some(found);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumer::{ConsumerError, Ctx};
    use crate::value::Map;

    async fn a(_: Message, _: Ctx) -> Result<(), ConsumerError> {
        Ok(())
    }

    fn msg(channel: &str, path: &str) -> Message {
        Message::new(
            channel,
            &Map::new()
                .with("path", path)
                .with("method", "GET")
                .with("reply_channel", "r!x"),
        )
        .unwrap()
    }

    fn resolved_name(router: &Router, channel: &str, path: &str) -> Option<(String, Kwargs)> {
        router
            .resolve(&msg(channel, path))
            .map(|r| (r.route.to_string(), r.kwargs))
    }

    fn kw(pairs: &[(&str, &str)]) -> Kwargs {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn route_table() {
        let router = Router::new([
            route("websocket.receive", a).path(r"/echo/$").named("echo"),
            include([
                route("websocket.receive", a)
                    .path(r"/(?P<room>[a-z]+)/$")
                    .named("room"),
                route("websocket.connect", a)
                    .path(r"/(?P<room>[a-z]+)/(?P<id>\d+)/$")
                    .named("room-id"),
            ])
            .path(r"/chat"),
            include([route("http.request", a).path(r"(?P<rest>.*)").named("api")])
                .path(r"/api/(?P<version>v\d)"),
            route("http.request", a).method("POST").named("post"),
            route("http.request", a).named("any-http"),
        ])
        .unwrap();
        type Case<'a> = (&'a str, &'a str, Option<(&'a str, Kwargs)>);
        let cases: &[Case<'_>] = &[
            ("websocket.receive", "/echo/", Some(("echo", kw(&[])))),
            // anchored at the start, like re.match
            ("websocket.receive", "/x/echo/", None),
            (
                "websocket.receive",
                "/chat/lobby/",
                Some(("room", kw(&[("room", "lobby")]))),
            ),
            ("websocket.receive", "/chat/lobby/7/", None),
            (
                "websocket.connect",
                "/chat/lobby/7/",
                Some(("room-id", kw(&[("room", "lobby"), ("id", "7")]))),
            ),
            ("websocket.receive", "/chat/LOBBY/", None),
            (
                "http.request",
                "/api/v2/users/1",
                Some(("api", kw(&[("version", "v2"), ("rest", "/users/1")]))),
            ),
            ("http.request", "/other", Some(("any-http", kw(&[])))),
            ("websocket.disconnect", "/echo/", None),
        ];
        for (channel, path, want) in cases {
            let got = resolved_name(&router, channel, path);
            let want = want
                .as_ref()
                .map(|(n, k)| (format!("route {n:?}"), k.clone()));
            assert_eq!(got, want, "{channel} {path}");
        }
        assert_eq!(
            router.channels(),
            ["websocket.receive", "websocket.connect", "http.request"]
        );
    }

    #[test]
    fn method_filter_and_first_match_wins() {
        let router = Router::new([
            route("http.request", a).method("POST").named("post"),
            route("http.request", a).named("any"),
        ])
        .unwrap();
        let post = Message::new(
            "http.request",
            &Map::new().with("method", "POST").with("path", "/"),
        )
        .unwrap();
        assert_eq!(&*router.resolve(&post).unwrap().route, "route \"post\"");
        assert_eq!(
            &*router.resolve(&msg("http.request", "/")).unwrap().route,
            "route \"any\""
        );
    }

    #[test]
    fn inner_kwargs_win() {
        let router =
            Router::new([include([route("x", a).path(r"/(?P<id>\d+)")]).path(r"/(?P<id>[a-z]+)")])
                .unwrap();
        let (_, k) = resolved_name(&router, "x", "/abc/42").unwrap();
        assert_eq!(k, kw(&[("id", "42")]));
    }

    #[test]
    fn missing_field_does_not_match() {
        let router =
            Router::new([route("x", a).filter("to_address", r".*@example\.com$")]).unwrap();
        assert!(router.resolve(&msg("x", "/")).is_none());
        let m = Message::new("x", &Map::new().with("to_address", "a@example.com")).unwrap();
        assert!(router.resolve(&m).is_some());
    }

    #[test]
    fn positional_group_is_an_error_naming_the_route() {
        let err = Router::new([route("websocket.receive", a).path(r"^/(\d+)/$")]).unwrap_err();
        assert!(matches!(err, RouteError::PositionalGroup { .. }));
        let text = err.to_string();
        assert!(text.contains("route(websocket.receive)"), "{text}");
        assert!(text.contains("positional"), "{text}");
    }

    #[test]
    fn invalid_regex_is_an_error_naming_the_route() {
        let err = Router::new([
            route("a", a),
            include([route("b", a).path("(?P<x>[").named("broken")]).path("/p"),
        ])
        .unwrap_err();
        assert!(matches!(err, RouteError::InvalidRegex { .. }));
        assert!(err.to_string().contains("route \"broken\""), "{err}");
    }

    #[test]
    fn bad_channel_and_empty_include_are_errors() {
        assert!(matches!(
            Router::new([route("no spaces", a)]).unwrap_err(),
            RouteError::InvalidChannel { .. }
        ));
        assert!(matches!(
            Router::new([include([])]).unwrap_err(),
            RouteError::EmptyInclude { .. }
        ));
    }

    #[test]
    fn options_inherit_from_include() {
        let router =
            Router::new([include([route("x", a).channel_session()]).strict_ordering()]).unwrap();
        let r = router.resolve(&msg("x", "/")).unwrap();
        assert!(r.options.strict_ordering && r.options.channel_session);
        assert!(!r.options.http_session);
        assert!(router.any_strict());
    }
}
