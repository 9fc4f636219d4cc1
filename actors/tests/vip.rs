//! EIPs against the store, with the MN's actors: what two requests at once decide.

mod common;

use common::{l3_record, mn, put, vm_record};
use strato_actors::network::{FLAT, ensure_providers, provider_uuid, service};
use strato_actors::records::{EipRecord, NetworkServiceL3RefRecord, VipRecord, VmNic};
use strato_actors::vip::{self, VipError};
use strato_actors::vm::state::VmState;
use uuid::Uuid;

/// A private L3 with the Flat provider's Eip, a public one, and a running VM's NIC on the
/// private one: `(private, public, nic)`.
async fn eip_network(db: &strato_storage::Db) -> (Uuid, Uuid, Uuid) {
    ensure_providers(db).await.unwrap();
    let (private, public) =
        (l3_record("private", Some(Uuid::new_v4())), l3_record("public", Some(Uuid::new_v4())));
    put(db, &private);
    put(db, &public);
    let (private, public) = (private.uuid, public.uuid);
    put(db, &eip_service(private));
    let mut vm = vm_record(Uuid::new_v4(), VmState::Running);
    let nic = Uuid::new_v4();
    vm.vm_nics.push(VmNic {
        uuid: nic,
        l3_network_uuid: private,
        ip: "10.0.0.5".into(),
        mac: "52:54:00:00:00:05".into(),
        bridge: None,
    });
    put(db, &vm);
    (private, public, nic)
}

/// L3 `l3`'s reference to the Flat provider's Eip.
fn eip_service(l3: Uuid) -> NetworkServiceL3RefRecord {
    NetworkServiceL3RefRecord {
        uuid: NetworkServiceL3RefRecord::id_of(l3, service::EIP),
        l3_network_uuid: l3,
        network_service_provider_uuid: provider_uuid(FLAT),
        network_service_type: service::EIP.into(),
    }
}

/// A VIP on `public` and an unattached EIP on it.
async fn vip_with_eip(db: &strato_storage::Db, public: Uuid, name: &str, ip: &str) -> Uuid {
    let vip = VipRecord {
        uuid: Uuid::new_v4(),
        name: format!("vip-{name}"),
        description: String::new(),
        l3_network_uuid: public,
        ip: ip.into(),
        netmask: "255.255.255.0".into(),
        gateway: "192.0.2.254".into(),
        use_for: None,
        peer_l3_network_uuid: None,
        private_ip: None,
        state: "Enabled".into(),
    };
    put(db, &vip);
    let mut eip = EipRecord {
        uuid: Uuid::new_v4(),
        name: format!("eip-{name}"),
        description: String::new(),
        vip_uuid: vip.uuid,
        vip_ip: String::new(),
        vm_nic_uuid: None,
        guest_ip: None,
        state: "Enabled".into(),
    };
    vip::create_eip(db, &mut eip, |_| Ok(())).await.unwrap();
    eip.uuid
}

/// Where a read waits (keys starting with the prefix), whom it tells, and what it waits for.
type Pause = (Vec<u8>, std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>);

/// A store whose first read of a record of one table, once armed, waits until the test
/// lets it go: an operation stopped between what it read and what it writes.
struct PausesOnRead {
    inner: strato_storage::MemStore,
    armed: std::sync::Mutex<Option<Pause>>,
}

impl strato_storage::Store for PausesOnRead {
    fn backend_name(&self) -> &'static str {
        "pauses-on-read"
    }
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, strato_storage::StoreError> {
        let value = self.inner.get(key)?;
        let mut armed = self.armed.lock().unwrap();
        if armed.as_ref().is_some_and(|(prefix, _, _)| key.starts_with(prefix)) {
            let (_, paused, go) = armed.take().unwrap();
            drop(armed);
            paused.send(()).unwrap();
            go.recv().unwrap();
        }
        Ok(value)
    }
    fn range(&self, start: &[u8], end: Option<&[u8]>, reverse: bool) -> strato_storage::KvIter<'_> {
        self.inner.range(start, end, reverse)
    }
    fn apply(&self, ops: Vec<strato_storage::RawOp>) -> Result<(), strato_storage::StoreError> {
        self.inner.apply(ops)
    }
    fn flush(&self) -> Result<(), strato_storage::StoreError> {
        self.inner.flush()
    }
}

/// An EIP attachment that read its network's Eip service, then the service detached before
/// the attachment wrote: the attachment sees it and is refused, and no EIP is left attached
/// on a network without the service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eip_is_not_attached_where_the_service_was_detached_meanwhile() {
    let store = std::sync::Arc::new(PausesOnRead {
        inner: strato_storage::MemStore::new(),
        armed: std::sync::Mutex::new(None),
    });
    let cluster = common::mn_on(strato_storage::Db::new(store.clone()), Default::default());
    let db = cluster.db.clone();
    let (private, public, nic) = eip_network(&db).await;
    let eip = vip_with_eip(&db, public, "late", "192.0.2.1").await;

    let (paused_tx, paused_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel();
    let prefix =
        format!("r/{}/", <NetworkServiceL3RefRecord as strato_storage::Record>::KIND).into_bytes();
    *store.armed.lock().unwrap() = Some((prefix, paused_tx, go_rx));
    let attach = {
        let (db, hosts) = (db.clone(), cluster.hosts.clone());
        tokio::spawn(async move {
            vip::attach_eip(&db, &hosts, eip, vip::nic_target(&db, nic).unwrap()).await
        })
    };
    tokio::task::spawn_blocking(move || paused_rx.recv().unwrap()).await.unwrap();
    strato_actors::l3::detach_services(
        &cluster.l3s,
        private,
        provider_uuid(FLAT),
        vec![service::EIP.into()],
    )
    .await
    .unwrap();
    go_tx.send(()).unwrap();
    let attached = attach.await.unwrap();
    assert!(
        matches!(&attached, Err(VipError::Invalid { field: "vmNicUuid", message }) if message.contains("no Eip service")),
        "{attached:?}"
    );
    assert_eq!(db.get::<EipRecord>(eip).unwrap().unwrap().record.vm_nic_uuid, None);

    // With the service back, the EIP attaches; then the service's detachment is refused.
    put(&db, &eip_service(private));
    vip::attach_eip(&db, &cluster.hosts, eip, vip::nic_target(&db, nic).unwrap()).await.unwrap();
    let refused = strato_actors::l3::detach_services(
        &cluster.l3s,
        private,
        provider_uuid(FLAT),
        vec![service::EIP.into()],
    )
    .await;
    assert!(
        matches!(&refused, Err(strato_actors::l3::L3Error::ServiceInUse { users, .. }) if users.len() == 1),
        "{refused:?}"
    );
}

/// Two EIPs attached to one NIC at the same moment: the two are different records, so no
/// compare-and-swap sees the other; one NIC has one EIP all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_eips_attached_to_one_nic_at_once_leave_it_one() {
    let cluster = mn();
    let db = &cluster.db;
    let (_, public, nic) = eip_network(db).await;
    for round in 0..20 {
        let mut eips = Vec::new();
        for i in 0..2u8 {
            let ip = format!("192.0.2.{}", round * 2 + i + 1);
            eips.push(vip_with_eip(db, public, &format!("{round}-{i}"), &ip).await);
        }
        let target = || vip::nic_target(db, nic).unwrap();
        let (a, b) = tokio::join!(
            vip::attach_eip(db, &cluster.hosts, eips[0], target()),
            vip::attach_eip(db, &cluster.hosts, eips[1], target()),
        );
        let won = [&a, &b].iter().filter(|r| r.is_ok()).count();
        assert_eq!(won, 1, "round {round}: {a:?} {b:?}");
        assert!(
            [a, b].into_iter().any(|r| matches!(r, Err(VipError::InUse(_)))),
            "round {round}: the loser is told the NIC is taken"
        );
        let on_nic = db.find::<EipRecord>("nic", &nic.into()).unwrap();
        assert_eq!(on_nic.len(), 1, "round {round}");
        for eip in eips {
            vip::delete_eip(db, &cluster.hosts, eip).await.unwrap();
        }
    }
}

/// A store that takes a given number of writes and refuses every one after them, as a
/// store does for an MN that died at that point: nothing after it lands.
struct DiesAfter {
    inner: strato_storage::MemStore,
    writes_left: std::sync::atomic::AtomicI64,
}

impl DiesAfter {
    fn new() -> std::sync::Arc<DiesAfter> {
        std::sync::Arc::new(DiesAfter {
            inner: strato_storage::MemStore::new(),
            writes_left: i64::MAX.into(),
        })
    }

    fn die_after(&self, writes: i64) {
        self.writes_left.store(writes, std::sync::atomic::Ordering::SeqCst);
    }
}

impl strato_storage::Store for DiesAfter {
    fn backend_name(&self) -> &'static str {
        "dies-after"
    }
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, strato_storage::StoreError> {
        self.inner.get(key)
    }
    fn range(&self, start: &[u8], end: Option<&[u8]>, reverse: bool) -> strato_storage::KvIter<'_> {
        self.inner.range(start, end, reverse)
    }
    fn apply(&self, ops: Vec<strato_storage::RawOp>) -> Result<(), strato_storage::StoreError> {
        if self.writes_left.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) <= 0 {
            return Err(strato_storage::StoreError::Backend {
                backend: "dies-after",
                operation: "apply",
                source: "the MN died before this write".into(),
            });
        }
        self.inner.apply(ops)
    }
    fn flush(&self) -> Result<(), strato_storage::StoreError> {
        self.inner.flush()
    }
}

/// Each booked address of the store and who holds it, checked against the VIPs: every VIP's
/// addresses are booked by it, and every booking is a VIP's.
fn bookings_match_vips(db: &strato_storage::Db, when: &str) {
    use strato_actors::records::UsedIpRecord;
    let booked: std::collections::BTreeSet<(String, Uuid)> = db
        .scan::<UsedIpRecord>()
        .map(|used| used.unwrap().record)
        .map(|used| (used.ip, used.owner))
        .collect();
    let named: std::collections::BTreeSet<(String, Uuid)> = db
        .scan::<VipRecord>()
        .map(|vip| vip.unwrap().record)
        .flat_map(|vip| {
            let forwarding = vip.private_ip.map(|ip| (ip, vip::forwarding_owner(vip.uuid)));
            std::iter::once((vip.ip, vip.uuid)).chain(forwarding)
        })
        .collect();
    assert_eq!(booked, named, "{when}: the bookings are the VIPs' addresses");
}

/// A VIP's creation and deletion, stopped by the MN's death after each of their writes in
/// turn, never leave an address booked that no VIP names, nor a VIP whose address is free;
/// a deletion repeated after the death (as the MN's next start repeats it) finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vip_and_its_addresses_land_and_go_together_whenever_the_mn_dies() {
    use strato_actors::ipam::IpRange;
    for writes in 0..4 {
        let store = DiesAfter::new();
        let cluster = common::mn_on(strato_storage::Db::new(store.clone()), Default::default());
        let db = &cluster.db;
        let network = |name: &str, net: u8| {
            let mut l3 = l3_record(name, Some(Uuid::new_v4()));
            l3.ip_ranges.push(IpRange {
                start: [10, net, 0, 10].into(),
                end: [10, net, 0, 20].into(),
                netmask: [255, 255, 255, 0].into(),
                gateway: [10, net, 0, 1].into(),
            });
            put(db, &l3);
            l3.uuid
        };
        let (public, private) = (network("public", 1), network("private", 2));
        let record = VipRecord {
            uuid: Uuid::new_v4(),
            name: "vip".into(),
            description: String::new(),
            l3_network_uuid: public,
            ip: String::new(),
            netmask: String::new(),
            gateway: String::new(),
            use_for: None,
            peer_l3_network_uuid: None,
            private_ip: None,
            state: "Enabled".into(),
        };

        store.die_after(writes);
        let created = vip::create_vip(db, &cluster.l3s, record.clone(), None, |_| Ok(())).await;
        store.die_after(i64::MAX);
        bookings_match_vips(db, &format!("creation stopped after {writes} write(s): {created:?}"));

        // A VIP with port forwarding's own address on the private network, deleted.
        let made = vip::create_vip(
            db,
            &cluster.l3s,
            VipRecord { uuid: Uuid::new_v4(), ..record },
            None,
            |_| Ok(()),
        )
        .await
        .unwrap();
        let forwarding = strato_actors::l3::allocate_ip(
            &cluster.l3s,
            private,
            vip::forwarding_owner(made.uuid),
            None,
        )
        .await
        .unwrap();
        let mut with_forwarding = db.get::<VipRecord>(made.uuid).unwrap().unwrap().record;
        with_forwarding.private_ip = Some(forwarding.to_string());
        with_forwarding.peer_l3_network_uuid = Some(private);
        put(db, &with_forwarding);
        bookings_match_vips(db, "with port forwarding's address");
        store.die_after(writes);
        let dropped = vip::drop_vip(db, &cluster.l3s, made.uuid).await;
        store.die_after(i64::MAX);
        let when = format!("deletion stopped after {writes} write(s): {dropped:?}");
        if dropped.is_err() {
            // What is left is still whole...
            bookings_match_vips(db, &when);
            // ...and the deletion, repeated, finishes.
            vip::drop_vip(db, &cluster.l3s, made.uuid).await.unwrap();
        }
        assert!(db.get::<VipRecord>(made.uuid).unwrap().is_none(), "{when}");
        bookings_match_vips(db, &format!("{when}, then repeated"));
    }
}
