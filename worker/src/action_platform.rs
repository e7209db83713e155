//! What an action asks of its platform: the network (`network=on`) and a container
//! image (`container-image`); and the record of the image it ran in.

use kiln_proto::prost::Message;
use kiln_proto::{protobuf, reapi};

use crate::container_image::{ImageRoot, CONTAINER_IMAGE_PROPERTY};

/// The platform property an action sets to reach the network from the sandbox.
pub const NETWORK_PROPERTY: (&str, &str) = ("network", "on");

/// The values the action gives platform property `name`: on the Action's platform, or
/// on the Command's, where Bazel 2.1 puts them.
fn platform_values<'a>(
    action: &'a reapi::Action,
    command: &'a reapi::Command,
    name: &'a str,
) -> impl Iterator<Item = &'a str> {
    #[allow(deprecated)]
    let platforms = [action.platform.as_ref(), command.platform.as_ref()];
    platforms
        .into_iter()
        .flatten()
        .flat_map(|platform| &platform.properties)
        .filter(move |property| property.name == name)
        .map(|property| property.value.as_str())
}

/// Whether the action asks for the host's network (`network=on`).
pub(crate) fn wants_network(action: &reapi::Action, command: &reapi::Command) -> bool {
    let (name, on) = NETWORK_PROPERTY;
    platform_values(action, command, name).any(|value| value == on)
}

/// The `container-image` the action names, if any.
pub(crate) fn wanted_image<'a>(
    action: &'a reapi::Action,
    command: &'a reapi::Command,
) -> Option<&'a str> {
    platform_values(action, command, CONTAINER_IMAGE_PROPERTY).next()
}

/// The ActionResult's record of the image an action ran in, tag resolved to a digest.
pub(crate) fn image_used(root: &ImageRoot) -> protobuf::Any {
    let used = kiln_proto::worker::v1::ContainerImageUsed {
        image: root.reference.clone(),
        manifest_digest: root.manifest_digest.to_string(),
    };
    protobuf::Any {
        type_url: kiln_proto::worker::v1::CONTAINER_IMAGE_USED_TYPE_URL.to_string(),
        value: used.encode_to_vec(),
    }
}
