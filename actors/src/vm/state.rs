//! The VM state machine, in one table.
//!
//! Every operation a user can ask of a VM is looked up here before anything happens: the
//! table says from which states it is allowed (ZStack's per-state whitelist: a VM in a
//! transitional state accepts only destroy), which transitional state the VM is in while the
//! operation runs, and where it lands on success and on failure. What the hypervisor reports
//! (reconciliation after a reconnect, an event from the agent) goes through [`observed`],
//! the only other way a state changes. Tests walk every pair.

use serde::{Deserialize, Serialize};

/// A VM's state (ZStack's `VmInstanceState`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum VmState {
    /// Recorded, never started (creation in progress).
    Created,
    /// Starting.
    Starting,
    /// Running.
    Running,
    /// Stopping.
    Stopping,
    /// Stopped.
    Stopped,
    /// Rebooting.
    Rebooting,
    /// Pausing.
    Pausing,
    /// Paused.
    Paused,
    /// Resuming.
    Resuming,
    /// Migrating.
    Migrating,
    /// Being destroyed.
    Destroying,
    /// Destroyed but recoverable until expunged.
    Destroyed,
    /// Being expunged.
    Expunging,
    /// Its host is unreachable; the truth is unknown until it reconnects.
    Unknown,
    /// An operation failed in a way that left the VM in no known state.
    Error,
}

/// What a user can ask of a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VmOp {
    /// Start.
    Start,
    /// Stop (graceful, then forced).
    Stop,
    /// Reboot.
    Reboot,
    /// Pause.
    Pause,
    /// Resume.
    Resume,
    /// Migrate to another host of the cluster (cold: the VM is stopped).
    Migrate,
    /// Destroy (recoverable unless the deletion policy is Direct).
    Destroy,
    /// Recover a destroyed VM.
    Recover,
    /// Expunge a destroyed VM: delete it for good.
    Expunge,
    /// Change CPU and memory (stopped only).
    ChangeOffering,
}

impl VmOp {
    /// Every operation, for tests and documentation.
    pub const ALL: [VmOp; 10] = [
        VmOp::Start,
        VmOp::Stop,
        VmOp::Reboot,
        VmOp::Pause,
        VmOp::Resume,
        VmOp::Migrate,
        VmOp::Destroy,
        VmOp::Recover,
        VmOp::Expunge,
        VmOp::ChangeOffering,
    ];
}

impl VmState {
    /// Every state, for tests and documentation.
    pub const ALL: [VmState; 15] = [
        VmState::Created,
        VmState::Starting,
        VmState::Running,
        VmState::Stopping,
        VmState::Stopped,
        VmState::Rebooting,
        VmState::Pausing,
        VmState::Paused,
        VmState::Resuming,
        VmState::Migrating,
        VmState::Destroying,
        VmState::Destroyed,
        VmState::Expunging,
        VmState::Unknown,
        VmState::Error,
    ];

    /// The state's name, as the API shows it and the `state` index keys it.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Created => "Created",
            VmState::Starting => "Starting",
            VmState::Running => "Running",
            VmState::Stopping => "Stopping",
            VmState::Stopped => "Stopped",
            VmState::Rebooting => "Rebooting",
            VmState::Pausing => "Pausing",
            VmState::Paused => "Paused",
            VmState::Resuming => "Resuming",
            VmState::Migrating => "Migrating",
            VmState::Destroying => "Destroying",
            VmState::Destroyed => "Destroyed",
            VmState::Expunging => "Expunging",
            VmState::Unknown => "Unknown",
            VmState::Error => "Error",
        }
    }

    /// Whether an operation is in progress on the VM.
    pub fn is_transitional(self) -> bool {
        matches!(
            self,
            VmState::Starting
                | VmState::Stopping
                | VmState::Rebooting
                | VmState::Pausing
                | VmState::Resuming
                | VmState::Migrating
                | VmState::Destroying
                | VmState::Expunging
        )
    }
}

/// How an allowed operation moves the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    /// The state while the operation runs.
    pub during: VmState,
    /// The state once it succeeded.
    pub on_success: VmState,
    /// The state if it failed.
    pub on_failure: VmState,
}

/// An operation the VM's state does not allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a VM in state {state:?} cannot {op:?}; allowed from {state:?}: {allowed:?}")]
pub struct InvalidState {
    /// The VM's state.
    pub state: VmState,
    /// What was asked.
    pub op: VmOp,
    /// What the state allows.
    pub allowed: &'static [VmOp],
}

/// The whitelist: what each state allows.
pub fn allowed(state: VmState) -> &'static [VmOp] {
    use VmOp::*;
    match state {
        // Its creation flow is running: it rolls back on failure, and a destroy beside it
        // would race its steps on the host. The creation's job ends either way.
        VmState::Created => &[],
        VmState::Stopped => &[Start, Migrate, Destroy, ChangeOffering],
        // Migration is cold (within the cluster): a running VM is stopped first.
        VmState::Running => &[Stop, Reboot, Pause, Destroy],
        VmState::Paused => &[Stop, Resume, Destroy],
        VmState::Destroyed => &[Recover, Expunge],
        // The truth is unknown: stopping (forced) and destroying are safe either way.
        VmState::Unknown | VmState::Error => &[Stop, Destroy],
        // ZStack's rule: a transitional state accepts only destroy.
        VmState::Starting
        | VmState::Stopping
        | VmState::Rebooting
        | VmState::Pausing
        | VmState::Resuming
        | VmState::Migrating => &[Destroy],
        VmState::Destroying | VmState::Expunging => &[],
    }
}

/// How `op` moves a VM in `state`, or why it may not.
pub fn plan(state: VmState, op: VmOp) -> Result<Transition, InvalidState> {
    let allowed_ops = allowed(state);
    if !allowed_ops.contains(&op) {
        return Err(InvalidState { state, op, allowed: allowed_ops });
    }
    let t = |during, on_success, on_failure| Transition { during, on_success, on_failure };
    Ok(match op {
        VmOp::Start => t(VmState::Starting, VmState::Running, VmState::Stopped),
        VmOp::Stop => t(VmState::Stopping, VmState::Stopped, state),
        VmOp::Reboot => t(VmState::Rebooting, VmState::Running, VmState::Running),
        VmOp::Pause => t(VmState::Pausing, VmState::Paused, VmState::Running),
        VmOp::Resume => t(VmState::Resuming, VmState::Running, VmState::Paused),
        // A cold migration leaves the VM stopped on its new host.
        VmOp::Migrate => t(VmState::Migrating, state, state),
        // A failed destroy leaves the VM as it was (the domain is still there), or Unknown
        // if it was between two states; the user can try again.
        VmOp::Destroy => t(
            VmState::Destroying,
            VmState::Destroyed,
            if state.is_transitional() { VmState::Unknown } else { state },
        ),
        VmOp::Recover => t(VmState::Destroyed, VmState::Stopped, VmState::Destroyed),
        VmOp::Expunge => t(VmState::Expunging, VmState::Expunging, VmState::Destroyed),
        VmOp::ChangeOffering => t(VmState::Stopped, VmState::Stopped, VmState::Stopped),
    })
}

/// What the hypervisor says about a VM's domain, for reconciliation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observation {
    /// The domain runs.
    Running,
    /// The domain is paused.
    Paused,
    /// The domain is off or absent.
    Off,
    /// The host cannot be reached.
    HostUnreachable,
}

/// The state a VM takes when the hypervisor reports `observation`; `None` leaves it as is.
///
/// A VM with an operation in progress is left to its operation (which will see the truth
/// itself); a destroyed VM stays destroyed (its leftover domain is the GC's business).
pub fn observed(state: VmState, observation: Observation) -> Option<VmState> {
    if state.is_transitional()
        || matches!(state, VmState::Created | VmState::Destroyed | VmState::Expunging)
    {
        return None;
    }
    let new = match observation {
        Observation::Running => VmState::Running,
        Observation::Paused => VmState::Paused,
        Observation::Off => VmState::Stopped,
        Observation::HostUnreachable => VmState::Unknown,
    };
    (new != state).then_some(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The creation flow owns a Created VM's record until its last step: no operation of
    /// the VM actor and no observation of a host changes it, and it is not a transitional
    /// state the next operation would repair.
    #[test]
    fn nothing_but_its_creation_touches_a_created_vm() {
        for op in VmOp::ALL {
            assert!(plan(VmState::Created, op).is_err(), "{op:?} on a Created VM");
        }
        for observation in [
            Observation::Running,
            Observation::Paused,
            Observation::Off,
            Observation::HostUnreachable,
        ] {
            assert_eq!(observed(VmState::Created, observation), None, "{observation:?}");
        }
        assert!(!VmState::Created.is_transitional());
    }

    #[test]
    fn a_state_is_named_as_the_api_shows_it() {
        for state in VmState::ALL {
            assert_eq!(serde_json::to_value(state).unwrap(), state.as_str());
        }
    }

    #[test]
    fn transitional_states_accept_only_destroy() {
        for state in VmState::ALL.into_iter().filter(|s| s.is_transitional()) {
            for op in VmOp::ALL {
                let allowed = plan(state, op).is_ok();
                let expected = op == VmOp::Destroy
                    && !matches!(state, VmState::Destroying | VmState::Expunging);
                assert_eq!(allowed, expected, "{state:?} / {op:?}");
            }
        }
    }

    #[test]
    fn every_plan_is_consistent_with_the_whitelist_and_names_the_state() {
        for state in VmState::ALL {
            for op in VmOp::ALL {
                match plan(state, op) {
                    Ok(t) => {
                        assert!(allowed(state).contains(&op));
                        assert!(
                            !t.on_success.is_transitional() || op == VmOp::Expunge,
                            "{state:?} {op:?}"
                        );
                        assert!(
                            !t.on_failure.is_transitional(),
                            "{state:?} {op:?} fails into {:?}",
                            t.on_failure
                        );
                    }
                    Err(e) => {
                        assert!(!allowed(state).contains(&op));
                        assert!(e.to_string().contains(&format!("{state:?}")));
                    }
                }
            }
        }
    }

    #[test]
    fn the_lifecycle_walks_through_the_table() {
        let mut state = VmState::Stopped;
        for op in [
            VmOp::Start,
            VmOp::Pause,
            VmOp::Resume,
            VmOp::Reboot,
            VmOp::Stop,
            VmOp::Migrate,
            VmOp::Destroy,
            VmOp::Recover,
        ] {
            let t = plan(state, op).unwrap();
            state = t.on_success;
        }
        assert_eq!(state, VmState::Stopped);
        assert!(plan(VmState::Running, VmOp::Start).is_err());
        assert!(plan(VmState::Running, VmOp::ChangeOffering).is_err());
        assert!(plan(VmState::Destroyed, VmOp::Start).is_err());
    }

    #[test]
    fn reconciliation_follows_the_hypervisor_but_not_during_operations() {
        assert_eq!(observed(VmState::Running, Observation::Off), Some(VmState::Stopped));
        assert_eq!(observed(VmState::Stopped, Observation::Running), Some(VmState::Running));
        assert_eq!(
            observed(VmState::Running, Observation::HostUnreachable),
            Some(VmState::Unknown)
        );
        assert_eq!(observed(VmState::Unknown, Observation::Running), Some(VmState::Running));
        assert_eq!(observed(VmState::Running, Observation::Running), None);
        assert_eq!(observed(VmState::Starting, Observation::Off), None);
        assert_eq!(observed(VmState::Destroyed, Observation::Running), None);
    }
}
