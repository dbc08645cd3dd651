//! A fake Kubernetes API server at the HTTP layer, for the watch source:
//! it answers list and watch requests for Services, EndpointSlices, Nodes
//! and ServiceCIDRs (unless told it predates them) from an object store the
//! test edits, streams watch events to open
//! watches, and can drop connections, expire resource versions (410 Gone)
//! or be unreachable (503). In process (`client`), or over HTTP on a
//! listener (`serve`) for an agent process.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use futures::channel::mpsc;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt as _, StreamBody, combinators::BoxBody};
use serde_json::{Value, json};

type Body = BoxBody<Bytes, Infallible>;

type WatchSender = mpsc::UnboundedSender<Result<Frame<Bytes>, Infallible>>;

#[derive(Default)]
struct State {
    resource_version: u64,
    /// kind ("services", ...) → name key → object
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    watches: Vec<(String, Selector, WatchSender)>,
    /// Every event, for watches resuming from a resource version.
    history: Vec<(u64, String, Value, Bytes)>,
    expired: bool,
    down: bool,
    /// Collections answered 404, as by an API server without them.
    unserved: Vec<String>,
    requests: Vec<String>,
}

#[derive(Clone, Default)]
pub struct FakeApi(Arc<Mutex<State>>);

/// The selectors the agent uses: `metadata.name=X` fields and `!label`
/// (absence) labels, applied as the API server would.
#[derive(Clone, Debug, Default)]
struct Selector {
    name: Option<String>,
    absent_labels: Vec<String>,
}

impl Selector {
    fn parse(query: &str) -> Self {
        let mut sel = Self::default();
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match k.as_ref() {
                "fieldSelector" => sel.name = v.strip_prefix("metadata.name=").map(String::from),
                "labelSelector" => {
                    sel.absent_labels =
                        v.split(',').filter_map(|t| t.strip_prefix('!')).map(String::from).collect()
                }
                _ => {}
            }
        }
        sel
    }

    fn matches(&self, obj: &Value) -> bool {
        let name_ok = self.name.as_deref().is_none_or(|n| obj["metadata"]["name"] == n);
        let labels = &obj["metadata"]["labels"];
        name_ok && self.absent_labels.iter().all(|l| labels.get(l).is_none())
    }
}

/// The collection a request path names.
fn collection(path: &str) -> Option<&'static str> {
    if path.ends_with("/services") {
        Some("services")
    } else if path.ends_with("/endpointslices") {
        Some("endpointslices")
    } else if path.ends_with("/nodes") {
        Some("nodes")
    } else if path.ends_with("/servicecidrs") {
        Some("servicecidrs")
    } else {
        None
    }
}

fn list_kind(collection: &str) -> (&'static str, &'static str) {
    match collection {
        "services" => ("ServiceList", "v1"),
        "endpointslices" => ("EndpointSliceList", "discovery.k8s.io/v1"),
        "servicecidrs" => ("ServiceCIDRList", "networking.k8s.io/v1"),
        _ => ("NodeList", "v1"),
    }
}

fn collection_of(obj: &Value) -> &'static str {
    match obj["kind"].as_str() {
        Some("Service") => "services",
        Some("EndpointSlice") => "endpointslices",
        Some("Node") => "nodes",
        Some("ServiceCIDR") => "servicecidrs",
        other => panic!("fake API has no kind {other:?}"),
    }
}

fn key_of(obj: &Value) -> String {
    format!(
        "{}/{}",
        obj["metadata"]["namespace"].as_str().unwrap_or(""),
        obj["metadata"]["name"].as_str().expect("object has a name")
    )
}

fn one(body: Value) -> Body {
    http_body_util::Full::new(Bytes::from(body.to_string())).boxed()
}

impl FakeApi {
    /// A kube client talking to this fake.
    pub fn client(&self) -> kube::Client {
        let api = self.clone();
        let service = tower::service_fn(move |req: Request<kube::client::Body>| {
            let api = api.clone();
            async move { Ok::<_, Infallible>(api.handle(req.uri())) }
        });
        kube::Client::new(service, "default")
    }

    /// Serves this fake over plain HTTP on `listener` (bound by the caller,
    /// e.g. inside a test namespace), from a thread of its own, until the
    /// returned guard is dropped.
    pub fn serve(&self, listener: std::net::TcpListener) -> std::io::Result<Served> {
        listener.set_nonblocking(true)?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let api = self.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
                tokio::pin!(stopped);
                loop {
                    let (stream, _) = tokio::select! {
                        _ = &mut stopped => return,
                        accepted = listener.accept() => match accepted {
                            Ok(a) => a,
                            Err(_) => continue,
                        },
                    };
                    let api = api.clone();
                    tokio::spawn(async move {
                        let service =
                            hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                                let api = api.clone();
                                async move { Ok::<_, Infallible>(api.handle(req.uri())) }
                            });
                        let io = hyper_util::rt::TokioIo::new(stream);
                        let _ =
                            hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                    });
                }
            });
        });
        Ok(Served(Some(stop)))
    }

    fn handle(&self, uri: &http::Uri) -> Response<Body> {
        let uri = uri.clone();
        let mut s = self.0.lock().unwrap();
        s.requests.push(uri.to_string());
        if s.down {
            return Response::builder().status(StatusCode::SERVICE_UNAVAILABLE).body(one(json!({}))).unwrap();
        }
        let not_found = || {
            let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "the server could not find the requested resource", "reason": "NotFound", "code": 404});
            Response::builder().status(StatusCode::NOT_FOUND).body(one(status)).unwrap()
        };
        let Some(coll) = collection(uri.path()) else {
            return not_found();
        };
        if s.unserved.iter().any(|u| u == coll) {
            return not_found();
        }
        let query = uri.query().unwrap_or("");
        let selector = Selector::parse(query);
        let watching = query.split('&').any(|p| p == "watch=true" || p == "watch=1");
        if !watching {
            let (kind, api_version) = list_kind(coll);
            let items: Vec<Value> = s
                .objects
                .get(coll)
                .map(|m| m.values().filter(|o| selector.matches(o)).cloned().collect())
                .unwrap_or_default();
            let body = json!({
                "kind": kind, "apiVersion": api_version,
                "metadata": {"resourceVersion": s.resource_version.to_string()},
                "items": items,
            });
            return Response::new(one(body));
        }
        if s.expired {
            // The watch's resource version is too old: the client must relist.
            let gone = json!({"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "too old resource version", "reason": "Expired", "code": 410}});
            return Response::new(one(gone));
        }
        let (tx, rx) = mpsc::unbounded();
        // Resuming from a resource version: replay what came after it.
        let since: u64 = query
            .split('&')
            .find_map(|p| p.strip_prefix("resourceVersion="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(u64::MAX);
        for (rv, c, obj, line) in &s.history {
            if *rv > since && c == coll && selector.matches(obj) {
                let _ = tx.unbounded_send(Ok(Frame::data(line.clone())));
            }
        }
        s.watches.push((coll.to_string(), selector, tx));
        Response::new(StreamBody::new(rx).boxed())
    }

    fn event(&self, kind: &str, mut obj: Value) {
        let mut s = self.0.lock().unwrap();
        s.resource_version += 1;
        obj["metadata"]["resourceVersion"] = json!(s.resource_version.to_string());
        let coll = collection_of(&obj);
        let objects = s.objects.entry(coll.to_string()).or_default();
        if kind == "DELETED" {
            objects.remove(&key_of(&obj));
        } else {
            objects.insert(key_of(&obj), obj.clone());
        }
        let line = Bytes::from(format!("{}\n", json!({"type": kind, "object": obj})));
        let rv = s.resource_version;
        s.history.push((rv, coll.to_string(), obj.clone(), line.clone()));
        s.watches.retain(|(c, sel, tx)| {
            c != coll || !sel.matches(&obj) || tx.unbounded_send(Ok(Frame::data(line.clone()))).is_ok()
        });
    }

    /// Creates or replaces an object (ADDED or MODIFIED to open watches).
    pub fn apply(&self, obj: Value) {
        let exists = {
            let s = self.0.lock().unwrap();
            s.objects.get(collection_of(&obj)).is_some_and(|m| m.contains_key(&key_of(&obj)))
        };
        self.event(if exists { "MODIFIED" } else { "ADDED" }, obj);
    }

    pub fn delete(&self, obj: Value) {
        self.event("DELETED", obj);
    }

    /// Changes the store with no event in the history, as if it had been
    /// compacted away: only a relist can see the change.
    pub fn apply_silently(&self, obj: Value) {
        let mut s = self.0.lock().unwrap();
        s.resource_version += 1;
        let mut obj = obj;
        obj["metadata"]["resourceVersion"] = json!(s.resource_version.to_string());
        s.objects.entry(collection_of(&obj).to_string()).or_default().insert(key_of(&obj), obj);
    }

    /// Closes every open watch, as a dropped connection would.
    pub fn drop_watches(&self) {
        self.0.lock().unwrap().watches.clear();
    }

    /// Answers new watches with 410 Gone until `set_expired(false)`.
    pub fn set_expired(&self, expired: bool) {
        let mut s = self.0.lock().unwrap();
        s.expired = expired;
        if expired {
            s.watches.clear();
        }
    }

    /// Answers everything with 503 while down; drops watches when going down.
    pub fn set_down(&self, down: bool) {
        let mut s = self.0.lock().unwrap();
        s.down = down;
        if down {
            s.watches.clear();
        }
    }

    /// Answers `collection` ("servicecidrs") 404 from now on, as an API
    /// server that predates it.
    pub fn unserve(&self, collection: &str) {
        self.0.lock().unwrap().unserved.push(collection.to_string());
    }

    pub fn requests(&self) -> Vec<String> {
        self.0.lock().unwrap().requests.clone()
    }

    pub fn open_watches(&self) -> usize {
        self.0.lock().unwrap().watches.iter().filter(|(_, _, tx)| !tx.is_closed()).count()
    }
}

/// Stops `FakeApi::serve` when dropped.
pub struct Served(Option<tokio::sync::oneshot::Sender<()>>);

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(stop) = self.0.take() {
            let _ = stop.send(());
        }
    }
}

/// Test objects.
pub fn service(name: &str, cluster_ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": cluster_ip, "ports": [{"port": 80, "targetPort": 8080}]}})
}

pub fn slice(service: &str, addresses: &[&str]) -> Value {
    let endpoints: Vec<Value> =
        addresses.iter().map(|a| json!({"addresses": [a], "nodeName": "node-1"})).collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-1"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4", "ports": [{"port": 8080}], "endpoints": endpoints})
}

pub fn node(name: &str, ip: &str, zone: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}]}})
}

pub fn service_cidr(name: &str, cidrs: &[&str]) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
        "metadata": {"name": name}, "spec": {"cidrs": cidrs}})
}
