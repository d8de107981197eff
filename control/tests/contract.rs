//! The registry contract, run against both backends: the in-memory one and a real etcd server
//! (started on free ports for each test). Whatever the cluster relies on is asserted here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use epserve_control::{
    ControlPlane, EtcdRegistry, Instance, Kind, MemoryRegistry, PlacementMap, Registry, RegistryError,
};
use epserve_testkit::etcd_server::EtcdServer;

/// A backend under test; holds the etcd server (if any) alive.
struct Backend {
    registry: Arc<dyn Registry>,
    _etcd: Option<EtcdServer>,
}

async fn memory() -> Backend {
    Backend { registry: Arc::new(MemoryRegistry::new()), _etcd: None }
}

async fn etcd() -> Backend {
    let server = EtcdServer::start(&std::env::temp_dir()).expect("start etcd (Debian package etcd-server)");
    let registry = EtcdRegistry::connect(&[server.endpoint()], "contract").await.expect("connect");
    Backend { registry: Arc::new(registry), _etcd: Some(server) }
}

/// etcd's smallest lease TTL with default timings is about 1.5 s, rounded up to whole seconds.
const TTL: Duration = Duration::from_secs(2);

async fn eventually(what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not within {within:?}");
}

async fn compare_and_swap(r: Arc<dyn Registry>) {
    assert!(r.put_if_version("cas", b"one".to_vec(), 0, None, None).await.expect("create"));
    assert!(!r.put_if_version("cas", b"again".to_vec(), 0, None, None).await.expect("exists"), "create twice");
    assert!(!r.put_if_version("cas", b"stale".to_vec(), 2, None, None).await.expect("wrong version"));
    assert!(r.put_if_version("cas", b"two".to_vec(), 1, None, None).await.expect("swap"));
    let e = r.get("cas").await.expect("get").expect("present");
    assert_eq!((e.value.as_slice(), e.version), (&b"two"[..], 2));
    r.put("cas", b"three".to_vec(), None).await.expect("put");
    assert_eq!(r.get("cas").await.expect("get").expect("present").version, 3, "every write counts");
    assert!(r.get("absent").await.expect("get").is_none());
}

async fn list_by_prefix(r: Arc<dyn Registry>) {
    for key in ["a/2", "a/1", "ab", "b/1"] {
        r.put(key, key.as_bytes().to_vec(), None).await.expect("put");
    }
    let keys: Vec<String> = r.list("a/").await.expect("list").into_iter().map(|e| e.key).collect();
    assert_eq!(keys, ["a/1", "a/2"]);
    assert!(r.list("zzz/").await.expect("list").is_empty());
}

async fn leases_expire_unless_kept_alive(r: Arc<dyn Registry>) {
    let kept = r.grant(TTL).await.expect("grant");
    let left = r.grant(TTL).await.expect("grant");
    r.put("live/kept", b"k".to_vec(), Some(kept)).await.expect("put");
    r.put("live/left", b"l".to_vec(), Some(left)).await.expect("put");
    assert_eq!(r.get("live/kept").await.expect("get").expect("present").lease, Some(kept));
    let started = Instant::now();
    while started.elapsed() < TTL * 2 {
        assert!(r.keep_alive(kept).await.expect("keep alive"), "a kept lease exists");
        tokio::time::sleep(TTL / 4).await;
    }
    assert!(r.get("live/left").await.expect("get").is_none(), "the unrenewed lease's key expired");
    assert!(r.get("live/kept").await.expect("get").is_some(), "the renewed lease's key stayed");
    assert!(!r.keep_alive(left).await.expect("keep alive"), "an expired lease is reported gone");
    match r.put("x", b"x".to_vec(), Some(left)).await {
        Err(RegistryError::Invalid(m)) => assert!(m.contains("does not exist"), "{m}"),
        other => panic!("put under an expired lease: {other:?}"),
    }
    r.revoke(kept).await.expect("revoke");
    assert!(r.get("live/kept").await.expect("get").is_none(), "revoking deletes at once");
}

async fn delete_only_by_the_holder(r: Arc<dyn Registry>) {
    let mine = r.grant(Duration::from_secs(30)).await.expect("grant");
    let other = r.grant(Duration::from_secs(30)).await.expect("grant");
    r.put("held", b"h".to_vec(), Some(mine)).await.expect("put");
    assert!(!r.delete_if_lease("held", other).await.expect("delete"));
    assert!(r.get("held").await.expect("get").is_some());
    assert!(r.delete_if_lease("held", mine).await.expect("delete"));
    assert!(r.get("held").await.expect("get").is_none());
}

async fn notified(c: &mut epserve_control::Changes) {
    tokio::time::timeout(TTL * 3, c.recv()).await.expect("notified in time").expect("open")
}

async fn watches_see_writes_deletes_and_expiry(r: Arc<dyn Registry>) {
    let mut changes = r.watch("w/").await.expect("watch");
    r.put("other/1", b"x".to_vec(), None).await.expect("put");
    r.put("w/1", b"x".to_vec(), None).await.expect("put");
    notified(&mut changes).await;
    let lease = r.grant(TTL).await.expect("grant");
    r.put("w/2", b"y".to_vec(), Some(lease)).await.expect("put");
    notified(&mut changes).await;
    // Expiry is a change too: the lease runs out with nobody touching the key.
    notified(&mut changes).await;
    assert!(r.get("w/2").await.expect("get").is_none(), "notified of the expiry");
}

fn worker(id: &str, experts: &[u32]) -> Instance {
    Instance { experts: experts.to_vec(), ..Instance::new(Kind::Worker, id, format!("127.0.0.1:{}", 1000 + id.len())) }
}

async fn instances_register_update_and_leave(r: Arc<dyn Registry>) {
    let plane = ControlPlane::new(r);
    let mut followed = plane.instances(Kind::Worker);
    let a = plane.register(worker("a", &[0, 1]), TTL);
    let b = plane.register(worker("b", &[2]), TTL);
    a.registered().await;
    b.registered().await;
    let ids = |v: &[Instance]| v.iter().map(|i| i.id.clone()).collect::<Vec<_>>();
    tokio::time::timeout(Duration::from_secs(10), followed.wait_for(|v| v.len() == 2))
        .await
        .expect("both")
        .expect("open");
    assert_eq!(ids(&followed.borrow()), ["a", "b"]);
    // Kept alive past several TTLs.
    tokio::time::sleep(TTL * 2).await;
    assert_eq!(ids(&plane.list(Kind::Worker).await.expect("list")), ["a", "b"]);
    assert!(plane.list(Kind::Coordinator).await.expect("list").is_empty());
    a.update(|i| i.experts.push(9));
    tokio::time::timeout(Duration::from_secs(10), followed.wait_for(|v| v.iter().any(|i| i.experts == [0, 1, 9])))
        .await
        .expect("update seen")
        .expect("open");
    a.leave().await;
    tokio::time::timeout(Duration::from_secs(10), followed.wait_for(|v| ids(v) == ["b"]))
        .await
        .expect("gone")
        .expect("open");
}

async fn lost_lease_registers_again(r: Arc<dyn Registry>) {
    let plane = ControlPlane::new(r.clone());
    let member = plane.register(worker("w", &[1]), TTL);
    let first = member.registered().await;
    // Another party (an operator, or etcd after a partition) ends the lease.
    r.revoke(first).await.expect("revoke");
    let mut state = member.state();
    tokio::time::timeout(TTL * 3, state.wait_for(|s| s.re_registrations == 1 && s.lease.is_some()))
        .await
        .expect("registered again in time")
        .expect("open");
    assert_ne!(member.lease(), Some(first));
    eventually("the record is back", TTL * 3, async || !plane.list(Kind::Worker).await.expect("list").is_empty()).await;
}

async fn placement_is_compare_and_swap(r: Arc<dyn Registry>) {
    let plane = ControlPlane::new(r);
    let mut followed = plane.watch_placement();
    assert!(plane.placement().await.expect("read").is_none());
    let mut map = PlacementMap { version: 0, layers: vec![] };
    map.layers.push(epserve_control::LayerPlacement { layer: 1, hosts: vec![vec!["a".into()], vec![]] });
    assert!(plane.swap_placement(&map, None).await.expect("create"));
    assert!(!plane.swap_placement(&map, None).await.expect("stale"), "a second writer with the same version loses");
    let stored = plane.placement().await.expect("read").expect("present");
    assert_eq!((stored.version, stored.hosts(1, 0)), (1, &["a".to_owned()][..]));
    let mut next = stored.clone();
    next.layers[0].hosts[1].push("b".into());
    assert!(plane.swap_placement(&next, None).await.expect("swap"));
    tokio::time::timeout(Duration::from_secs(10), followed.wait_for(|m| m.as_ref().is_some_and(|m| m.version == 2)))
        .await
        .expect("followed")
        .expect("open");
    assert_eq!(followed.borrow().as_ref().map(|m| m.hosts(1, 1).to_vec()), Some(vec!["b".to_owned()]));
}

async fn one_leader_and_a_successor(r: Arc<dyn Registry>) {
    let plane = ControlPlane::new(r);
    let c1 = plane.register(Instance::new(Kind::Coordinator, "c1", "x:1"), TTL);
    c1.registered().await;
    let mut l1 = plane.campaign("placement", &c1);
    tokio::time::timeout(Duration::from_secs(10), l1.wait_for(Option::is_some)).await.expect("c1 leads").expect("open");
    let c2 = plane.register(Instance::new(Kind::Coordinator, "c2", "x:2"), TTL);
    c2.registered().await;
    let mut l2 = plane.campaign("placement", &c2);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(l2.borrow_and_update().is_none(), "only one leader");
    assert_eq!(plane.leader("placement").await.expect("leader").as_deref(), Some("c1"));
    c1.leave().await;
    tokio::time::timeout(Duration::from_secs(10), l2.wait_for(Option::is_some))
        .await
        .expect("c2 takes over")
        .expect("open");
    assert_eq!(plane.leader("placement").await.expect("leader").as_deref(), Some("c2"));
}

/// A leader that lost its leadership (its lease expired while it was stalled, say) and has not
/// noticed yet writes with its old fence: refused, while its successor's fenced writes go through.
async fn deposed_leaders_placement_writes_are_refused(r: Arc<dyn Registry>) {
    let plane = ControlPlane::new(r);
    let c1 = plane.register(Instance::new(Kind::Coordinator, "c1", "x:1"), TTL);
    c1.registered().await;
    let mut l1 = plane.campaign("placement", &c1);
    let f1 = tokio::time::timeout(Duration::from_secs(10), l1.wait_for(Option::is_some))
        .await
        .expect("c1 leads")
        .expect("open")
        .clone()
        .expect("fence");
    let map = PlacementMap {
        version: 0,
        layers: vec![epserve_control::LayerPlacement { layer: 0, hosts: vec![vec!["w1".into()]] }],
    };
    assert!(plane.swap_placement(&map, Some(&f1)).await.expect("write"), "the leader writes");
    let c2 = plane.register(Instance::new(Kind::Coordinator, "c2", "x:2"), TTL);
    c2.registered().await;
    let mut l2 = plane.campaign("placement", &c2);
    c1.leave().await;
    let f2 = tokio::time::timeout(Duration::from_secs(10), l2.wait_for(Option::is_some))
        .await
        .expect("c2 takes over")
        .expect("open")
        .clone()
        .expect("fence");
    assert_ne!(f1, f2);
    let mut stale = plane.placement().await.expect("read").expect("present");
    stale.layers[0].hosts[0] = vec!["w-from-the-deposed-leader".into()];
    assert!(!plane.swap_placement(&stale, Some(&f1)).await.expect("write"), "the deposed leader's write is refused");
    let stored = plane.placement().await.expect("read").expect("present");
    assert_eq!((stored.version, stored.hosts(0, 0)), (1, &["w1".to_owned()][..]), "unchanged");
    stale.layers[0].hosts[0] = vec!["w2".into()];
    assert!(plane.swap_placement(&stale, Some(&f2)).await.expect("write"), "the new leader's write goes through");
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod in_memory {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::memory().await.registry.clone()).await; })*
        }
        mod on_etcd {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let backend = super::etcd().await;
                super::$name(backend.registry.clone()).await;
            })*
        }
    };
}

contract!(
    compare_and_swap,
    list_by_prefix,
    leases_expire_unless_kept_alive,
    delete_only_by_the_holder,
    watches_see_writes_deletes_and_expiry,
    instances_register_update_and_leave,
    lost_lease_registers_again,
    placement_is_compare_and_swap,
    one_leader_and_a_successor,
    deposed_leaders_placement_writes_are_refused,
);
