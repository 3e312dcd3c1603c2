// The HTTP API's request bodies (OpenAI's chat/completions and completions, plus edgelora's
// extensions `adapters`, `top_k` and `ignore_eos`) and the adapter-management body, as zod schemas:
// the source of truth for what the server accepts. Unknown fields are ignored, as OpenAI-compatible
// servers do; fields edgelora cannot honour are refused by name.
import { z } from 'zod';

const adapterRef = z.object({
  id: z.string().min(1),
  /** Multiplies the adapter's own alpha/r scaling; default: the scale it was loaded with. */
  scale: z.number().finite().optional(),
});

const sampling = {
  model: z.string().min(1),
  temperature: z.number().min(0).max(2).nullish(),
  top_p: z.number().gt(0).max(1).nullish(),
  /** Extension (llama.cpp, vLLM): keep the K most likely tokens; 0 or -1 = no limit. */
  top_k: z.number().int().min(-1).nullish(),
  max_tokens: z.number().int().min(1).nullish(),
  max_completion_tokens: z.number().int().min(1).nullish(),
  seed: z.number().int().nullish(),
  stop: z.union([z.string(), z.array(z.string().min(1)).max(8)]).nullish(),
  n: z.number().int().nullish(),
  stream: z.boolean().nullish(),
  stream_options: z.object({ include_usage: z.boolean().nullish() }).loose().nullish(),
  /** Extension: stack these adapters (after the one `model` names, if any). */
  adapters: z.array(adapterRef).max(16).nullish(),
  /** Extension (vLLM): keep going past end-of-sequence tokens. */
  ignore_eos: z.boolean().nullish(),
  logprobs: z.unknown().optional(),
  tools: z.unknown().optional(),
  echo: z.unknown().optional(),
};

const contentPart = z.object({ type: z.literal('text'), text: z.string() }).loose();
const message = z
  .object({
    role: z.enum(['system', 'developer', 'user', 'assistant', 'tool']),
    content: z.union([z.string(), z.array(contentPart)]).nullish(),
  })
  .loose();

export const chatCompletionBody = z.object({ ...sampling, messages: z.array(message).min(1) }).loose();
export type ChatCompletionBody = z.infer<typeof chatCompletionBody>;

export const completionBody = z.object({ ...sampling, prompt: z.union([z.string(), z.array(z.string()).length(1)]) }).loose();
export type CompletionBody = z.infer<typeof completionBody>;

export const loadAdapterBody = z.object({
  id: z.string().regex(/^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/, 'letters, digits, ".", "_" and "-", at most 128, not starting with a punctuation mark'),
  path: z.string().min(1),
  scale: z.number().finite().optional(),
});
export type LoadAdapterBody = z.infer<typeof loadAdapterBody>;

/** The text of a chat message's content (text parts joined). */
export function messageText(content: z.infer<typeof message>['content']): string {
  if (content == null) return '';
  return typeof content === 'string' ? content : content.map((p) => p.text).join('');
}

/** "field.sub[0]: problem" for the first zod issue, and the field path for the error body's `param`. */
export function describeZodError(err: z.ZodError): { message: string; param: string | null } {
  const issue = err.issues[0];
  if (!issue) return { message: 'invalid request body', param: null };
  const param = issue.path.length > 0 ? issue.path.map((p) => (typeof p === 'number' ? `[${p}]` : String(p))).join('.').replace(/\.\[/g, '[') : null;
  return { message: param ? `${param}: ${issue.message}` : issue.message, param };
}
