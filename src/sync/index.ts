// Public API of fleet sync: the hub, the device agent, the operator client, the adapter activator
// interface, keys, the embedded broker and the protocol's topic table and message schemas.
export { Hub, type HubOptions, type HubStats, type HubEvents } from './hub/hub.js';
export { Agent, type AgentOptions, type AgentEvents, type Installed } from './agent/agent.js';
export { Operator, type OperatorOptions, type FleetSnapshot } from './operator.js';
export { ValidatingActivator, validateAdapterDir, type AdapterActivator, type ActivationInfo } from './agent/activator.js';
export { generateSigningKey, loadSigningKey, loadPublicKey, writeKeyPair, keyIdOf, type SigningKey } from './protocol/signing.js';
export { startEmbeddedBroker, type EmbeddedBroker } from './transport/embedded-broker.js';
export { Link, brokerUrlList, type BrokerOptions, type InboundHook } from './transport/mqtt.js';
export { ResumableFile } from './transfer/resumable-file.js';
export { Refusals, dispatch, type Handlers, type Refusal } from './protocol/inbound.js';
export { HubStore, type BlobEntry } from './hub/store.js';
export { packAdapterDir, unpack, readModelFingerprint } from './transfer/pack.js';
export { topics, parseTarget, targetKey, type Target } from './protocol/topics.js';
export * as messages from './protocol/messages.js';
export { generateEncKey, loadEncKey, loadEncPublicKey, writeEncKeyPair, encKeyIdOf, sealBlob, unwrap, openChunk, type EncKey, type Recipient } from './protocol/envelope.js';
export { enroll, unenroll, readEnrolments, recipientsFor, enrolmentFromStatus, keyState, type Enrolment, type KeyState } from './hub/enrolment.js';
