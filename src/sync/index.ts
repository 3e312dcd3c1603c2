// Public API of fleet sync: the hub, the device agent, the operator client, the adapter activator
// interface, keys, the embedded broker and the protocol's topic table and message schemas.
export { Hub, type HubOptions, type HubStats } from './hub.js';
export { Agent, type AgentOptions, type Installed } from './agent.js';
export { Operator, type OperatorOptions, type FleetSnapshot } from './operator.js';
export { ValidatingActivator, validateAdapterDir, type AdapterActivator, type ActivationInfo } from './activator.js';
export { generateSigningKey, loadSigningKey, loadPublicKey, writeKeyPair, keyIdOf, type SigningKey } from './signing.js';
export { startEmbeddedBroker, type EmbeddedBroker } from './embedded-broker.js';
export { Link, type BrokerOptions, type InboundHook } from './mqtt.js';
export { HubStore, type BlobEntry } from './store.js';
export { packAdapterDir, unpack, readModelFingerprint } from './pack.js';
export { topics, parseTarget, targetKey, type Target } from './topics.js';
export * as messages from './messages.js';
