//! The worker's way to its coordinator's CAS: kiln-client's [`RemoteCas`], the same
//! client `kiln run` uses, probed for the server's limits on first use (a worker may
//! start before its coordinator answers) and then bound to each action's instance.

use kiln_client::{Credentials, Invocation, RemoteCas};
use kiln_store::DigestFunction;
use tokio::sync::OnceCell;
use tonic::transport::Channel;

use crate::WorkerError;

pub struct CasConnection {
    channel: Channel,
    /// The server's capabilities, asked for once.
    probed: OnceCell<RemoteCas>,
    /// Tags this worker's CAS calls in the coordinator's logs and traces.
    invocation: Invocation,
}

impl CasConnection {
    /// CAS calls carry the join token: a coordinator whose auth is on lets the pool's
    /// workers read and write the CAS with it.
    pub fn new(channel: Channel, join_token: &str) -> Self {
        let credentials = (!join_token.is_empty())
            .then(|| Credentials::bearer(join_token))
            .flatten();
        CasConnection {
            channel,
            probed: OnceCell::new(),
            invocation: Invocation::new().with_credentials(credentials),
        }
    }

    /// The CAS bound to one action's instance name and digest function.
    pub async fn for_action(
        &self,
        instance_name: &str,
        function: DigestFunction,
    ) -> Result<RemoteCas, WorkerError> {
        let probed = self
            .probed
            .get_or_try_init(|| {
                RemoteCas::with_channel(
                    self.channel.clone(),
                    instance_name,
                    function,
                    self.invocation.clone(),
                )
            })
            .await?;
        Ok(probed.for_instance(instance_name, function)?)
    }
}
