// Device profiles: the public surface used by generate, eval, finetune and doctor.
export { resolveProfile, providerConfig, type ResolveOptions, type ResolvedProfile } from './resolve.js';
export { checkMemoryPlan, estimateInferenceMemory, formatBytes, type MemoryPlan, type InferenceMemoryInput } from './memory.js';
export { ortProber, staticProber, planProviders, probeModelBytes, locateOrt, type EpProber, type EpProbe, type EpProbeReport, type ProviderPlan } from './providers.js';
export { readDeviceFacts, chooseProfile, checkRules, type DeviceFacts, type DetectOptions } from './detect.js';
export { loadBuiltinProfiles, loadProfileFile, builtinProfilesDir, applyOverrides, parseProfileSets, OVERRIDE_ALIASES, type LoadedProfile } from './load.js';
export { validateProfile, deviceProfileSchema, EP_NAMES, type DeviceProfile, type EpName, type ExecutionProviderEntry, type FinetuneDefaults } from './schema.js';
