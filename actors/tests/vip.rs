//! EIPs against the store, with the MN's actors: what two requests at once decide.

mod common;

use common::{l3_record, mn, put, vm_record};
use strato_actors::network::{FLAT, ensure_providers, provider_uuid, service};
use strato_actors::records::{EipRecord, NetworkServiceL3RefRecord, VipRecord, VmNic};
use strato_actors::vip::{self, VipError};
use strato_actors::vm::state::VmState;
use uuid::Uuid;

/// Two EIPs attached to one NIC at the same moment: the two are different records, so no
/// compare-and-swap sees the other; one NIC has one EIP all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_eips_attached_to_one_nic_at_once_leave_it_one() {
    let cluster = mn();
    let db = &cluster.db;
    ensure_providers(db).await.unwrap();
    let (private, public) =
        (l3_record("private", Some(Uuid::new_v4())), l3_record("public", Some(Uuid::new_v4())));
    put(db, &private);
    put(db, &public);
    let (private, public) = (private.uuid, public.uuid);
    put(
        db,
        &NetworkServiceL3RefRecord {
            uuid: NetworkServiceL3RefRecord::id_of(private, service::EIP),
            l3_network_uuid: private,
            network_service_provider_uuid: provider_uuid(FLAT),
            network_service_type: service::EIP.into(),
        },
    );
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
    for round in 0..20 {
        let mut eips = Vec::new();
        for i in 0..2u8 {
            let vip = VipRecord {
                uuid: Uuid::new_v4(),
                name: format!("vip-{round}-{i}"),
                description: String::new(),
                l3_network_uuid: public,
                ip: format!("192.0.2.{}", round * 2 + i + 1),
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
                name: format!("eip-{round}-{i}"),
                description: String::new(),
                vip_uuid: vip.uuid,
                vip_ip: String::new(),
                vm_nic_uuid: None,
                guest_ip: None,
                state: "Enabled".into(),
            };
            vip::create_eip(db, &mut eip, |_| Ok(())).await.unwrap();
            eips.push(eip.uuid);
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
