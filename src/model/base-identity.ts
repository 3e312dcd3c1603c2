// Which base an adapter belongs to, and the one rule every place that applies, merges or accepts an
// adapter follows (the loader, `adapter merge`, the fleet agent). An adapter binds to the SOURCE model
// (manifest.json `sourceFingerprint`) and records the quantization it was trained on (`fingerprint` and a
// label); on another quantization of the same source it applies with a note, on another source it is
// refused. Pure: no files, so the sync agent uses it on what a manifest says.

/** What identifies a base on either side; null where it is not known. */
export interface BaseRef {
  /** The quantized model's fingerprint (manifest.json `fingerprint`). */
  readonly fingerprint: string | null;
  /** The source model's fingerprint (manifest.json `sourceFingerprint`); null before it existed. */
  readonly sourceFingerprint: string | null;
  /** The quantization in words ("nf4, block 64, float table"), for messages. */
  readonly quant?: string | null;
}

export type BaseMatch =
  /** Nothing to compare: a plain PEFT adapter (no binding) or a base of unknown identity. */
  | { readonly kind: 'unchecked' }
  /** Trained on exactly this quantized model. */
  | { readonly kind: 'exact' }
  /** Same source model, another quantization: allowed; `note` is the one line to show. */
  | { readonly kind: 'other-quantization'; readonly note: string }
  /** Refused: `case` says why, `message` and `hint` are ready for an EdgeloraError. */
  | {
      readonly kind: 'refused';
      readonly case: 'other-model' | 'adapter-before-source-binding' | 'model-before-source-fingerprint';
      /** "<what> trained for another base…: <reason>", ready for an EdgeloraError with `hint`. */
      readonly message: string;
      /** The case in words, without the subject (for messages that name the adapter their own way). */
      readonly reason: string;
      readonly hint: string;
    };

const short = (fp: string) => `${fp.slice(0, 16)}…`;

/** The quantization label of a manifest's `quant` (nf4/fp4/int4/fp32, block size, table). */
export function quantLabel(q: { format: string; blockSize: number; doubleQuant?: boolean; embeddings?: string | undefined }): string {
  return `${q.format}, block ${q.blockSize}${q.doubleQuant ? ', double-quant' : ''}, ${q.embeddings ?? 'float'} table`;
}

/**
 * Compares what an adapter is bound to with the base it meets. `what` names the adapter in messages
 * ("adapter", "adapter style v3").
 */
export function matchBase(adapter: BaseRef, model: BaseRef, what = 'adapter'): BaseMatch {
  if (adapter.fingerprint === null && adapter.sourceFingerprint === null) return { kind: 'unchecked' };
  if (model.fingerprint === null && model.sourceFingerprint === null) return { kind: 'unchecked' };
  if (adapter.fingerprint !== null && adapter.fingerprint === model.fingerprint) return { kind: 'exact' };
  const trained = `${adapter.quant ?? 'another quantization'}${adapter.fingerprint ? ` (${short(adapter.fingerprint)})` : ''}`;
  const here = `${model.quant ?? 'this quantization'}${model.fingerprint ? ` (${short(model.fingerprint)})` : ''}`;
  if (adapter.sourceFingerprint !== null && model.sourceFingerprint !== null) {
    if (adapter.sourceFingerprint === model.sourceFingerprint) {
      return { kind: 'other-quantization', note: `${what} was trained on ${trained} and is applied to ${here} of the same source model ${short(model.sourceFingerprint)}` };
    }
    const reason = `a different source model (the adapter's is ${short(adapter.sourceFingerprint)}, trained on ${trained}; this base's is ${short(model.sourceFingerprint)})`;
    return {
      kind: 'refused',
      case: 'other-model',
      message: `${what} trained for another base: ${reason}`,
      reason,
      hint: 'use a quantization of the checkpoint the adapter was fine-tuned on, or fine-tune an adapter on this model',
    };
  }
  if (adapter.sourceFingerprint === null) {
    const reason = `the adapter predates source-model binding and is bound to the quantized base ${trained} only; this base is ${here}`;
    return {
      kind: 'refused',
      case: 'adapter-before-source-binding',
      message: `${what} trained for another base? ${reason}`,
      reason,
      hint: 'such an adapter cannot tell another model from another quantization of the same model: apply it to the model directory it was trained on, or fine-tune it again with this edgelora',
    };
  }
  const reason = `this base (${here}) was quantized before edgelora recorded source fingerprints, so whether it is the adapter's source model ${short(adapter.sourceFingerprint)} (trained on ${trained}) cannot be told`;
  return {
    kind: 'refused',
    case: 'model-before-source-fingerprint',
    message: `${what} trained for another base? ${reason}`,
    reason,
    hint: 're-run `edgelora quantize` on the source checkpoint (its manifest then names its source model), or use the model directory the adapter was trained on',
  };
}
