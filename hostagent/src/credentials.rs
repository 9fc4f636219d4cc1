//! The agent's credentials: enrolled (a certificate from its MN), or waiting to enroll with a
//! bootstrap secret.
//!
//! An agent starts enrolled when its data directory holds the certificate its MN issued
//! earlier; a bootstrap secret given then is not used (it was spent by that enrollment). Otherwise it needs a bootstrap secret, and it serves TLS with a self-signed
//! certificate over its own key until the MN answers its enrollment with a certificate, which
//! it stores and switches to for every later session (see [`strato_proto::pki`] for the
//! flow). The switch happens under a lock, between sessions: a session accepted before it
//! keeps the configuration it was accepted with.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rustls::ServerConfig;
use strato_proto::TlsError;
use strato_proto::pki::BootstrapSecret;
use strato_proto::tls::AgentIdentity;

enum State {
    Enrolled(Arc<ServerConfig>),
    Waiting { bootstrap: BootstrapSecret, config: Arc<ServerConfig> },
}

/// What the agent presents to the MN and whom it accepts.
pub struct Credentials {
    identity: AgentIdentity,
    state: Mutex<State>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("identity", &self.identity).finish_non_exhaustive()
    }
}

impl Credentials {
    /// The credentials kept in `data_dir`, or, before the agent enrolled, those of
    /// `bootstrap`.
    pub fn open(data_dir: &Path, bootstrap: Option<BootstrapSecret>) -> Result<Self, TlsError> {
        let identity = AgentIdentity::open(data_dir)?;
        let state = match (identity.enrolled_config()?, bootstrap) {
            (Some(config), _) => State::Enrolled(config),
            (None, Some(bootstrap)) => {
                let config = identity.bootstrap_config(&bootstrap.ca_pem)?;
                State::Waiting { bootstrap, config }
            }
            (None, None) => return Err(TlsError::NotEnrolled { dir: data_dir.to_owned() }),
        };
        Ok(Credentials { identity, state: Mutex::new(state) })
    }

    /// The TLS configuration for the next session.
    pub(crate) fn config(&self) -> Arc<ServerConfig> {
        match &*self.state.lock().expect("credentials lock") {
            State::Enrolled(config) | State::Waiting { config, .. } => config.clone(),
        }
    }

    /// The bootstrap secret, while the agent waits to enroll.
    pub(crate) fn waiting(&self) -> Option<String> {
        match &*self.state.lock().expect("credentials lock") {
            State::Enrolled(_) => None,
            State::Waiting { bootstrap, .. } => Some(bootstrap.secret.clone()),
        }
    }

    /// The agent's raw public key.
    pub(crate) fn public_key(&self) -> Vec<u8> {
        self.identity.public_key()
    }

    /// Keeps the certificate the MN issued and serves with it from the next session on.
    pub(crate) fn enroll(&self, certificate: &str) -> Result<(), TlsError> {
        let mut state = self.state.lock().expect("credentials lock");
        let State::Waiting { bootstrap, .. } = &*state else { return Ok(()) };
        let config = self.identity.store(&bootstrap.ca_pem, certificate)?;
        *state = State::Enrolled(config);
        Ok(())
    }
}
