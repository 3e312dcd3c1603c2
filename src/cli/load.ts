// Shared by generate/eval: load a quantized model, then the --adapter dir[:scale] list, activated in order.
import { ModelRuntime, type LoraFeeds } from '../runtime/model.js';
import { AdapterManager, parseAdapterSpec } from '../adapters/manager.js';
import type { InferenceSession } from 'onnxruntime-node';

export interface Loaded {
  model: ModelRuntime;
  adapters: AdapterManager;
  lora: LoraFeeds | undefined;
}

export async function loadModelWithAdapters(dir: string, specs: string[], sessionOptions?: InferenceSession.SessionOptions): Promise<Loaded> {
  const model = await ModelRuntime.load(dir, sessionOptions ? { sessionOptions } : {});
  const adapters = new AdapterManager(model);
  for (const spec of specs) {
    const { dir: adir, scale } = parseAdapterSpec(spec);
    const id = await adapters.load(adir);
    adapters.activate(id, scale);
  }
  return { model, adapters, lora: specs.length > 0 ? adapters.feeds() : undefined };
}
