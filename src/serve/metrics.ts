// Prometheus metrics of the serve process (prom-client, its own registry): requests by endpoint and
// status, prompt and completion tokens, queue depth, running rows, batch sizes, time to first token,
// decode tokens/s over the last steps, and the loaded adapters. It is the engine's observer.
import client from 'prom-client';
import type { EngineObserver, CompletionResult } from './engine.js';
import type { AdapterInfo } from '../adapters/manager.js';

/** Decode steps the tokens/s gauge averages over. */
const WINDOW = 32;

export class ServeMetrics implements EngineObserver {
  readonly registry = new client.Registry();
  private readonly requests: client.Counter<'endpoint' | 'status'>;
  private readonly promptTokens: client.Counter;
  private readonly completionTokens: client.Counter;
  private readonly batchSize: client.Histogram;
  private readonly ttft: client.Histogram;
  private readonly decodeTokens: client.Counter;
  private readonly decodeSeconds: client.Counter;
  private readonly steps: { rows: number; ms: number }[] = [];

  constructor(source: { queueDepth: () => number; running: () => number; adapters: () => AdapterInfo[] }) {
    const registers = [this.registry];
    client.collectDefaultMetrics({ register: this.registry, prefix: 'edgelora_process_' });
    this.requests = new client.Counter({ name: 'edgelora_requests_total', help: 'HTTP requests by endpoint and status code', labelNames: ['endpoint', 'status'], registers });
    this.promptTokens = new client.Counter({ name: 'edgelora_prompt_tokens_total', help: 'prompt tokens of finished completions', registers });
    this.completionTokens = new client.Counter({ name: 'edgelora_completion_tokens_total', help: 'completion tokens generated', registers });
    this.batchSize = new client.Histogram({ name: 'edgelora_batch_size', help: 'rows per forward (prefills and decode steps)', buckets: [1, 2, 3, 4, 6, 8, 12, 16, 24, 32], registers });
    this.ttft = new client.Histogram({ name: 'edgelora_time_to_first_token_seconds', help: 'from arrival to the first sampled token', buckets: [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30], registers });
    this.decodeTokens = new client.Counter({ name: 'edgelora_decode_tokens_total', help: 'tokens produced by decode steps (rows × steps; prefills excluded)', registers });
    this.decodeSeconds = new client.Counter({ name: 'edgelora_decode_seconds_total', help: 'time spent in decode forwards (rate(tokens)/rate(seconds) = decode tokens/s)', registers });
    const steps = this.steps;
    new client.Gauge({ name: 'edgelora_queue_depth', help: 'requests waiting for a batch slot', registers, collect() { this.set(source.queueDepth()); } });
    new client.Gauge({ name: 'edgelora_running_rows', help: 'rows in the decode batch', registers, collect() { this.set(source.running()); } });
    new client.Gauge({
      name: 'edgelora_decode_tokens_per_second',
      help: `aggregate decode tokens/s over the last ${WINDOW} decode steps`,
      registers,
      collect() {
        const ms = steps.reduce((a, s) => a + s.ms, 0);
        this.set(ms > 0 ? steps.reduce((a, s) => a + s.rows, 0) / (ms / 1000) : 0);
      },
    });
    new client.Gauge({
      name: 'edgelora_adapter_loaded',
      help: 'loaded adapters (1 per adapter, labelled with id and rank)',
      labelNames: ['id', 'rank'],
      registers,
      collect() {
        this.reset();
        for (const a of source.adapters()) this.set({ id: a.id, rank: String(a.rank) }, 1);
      },
    });
  }

  request(endpoint: string, status: number): void {
    this.requests.inc({ endpoint, status: String(status) });
  }

  batch(rows: number): void {
    this.batchSize.observe(rows);
  }

  firstToken(ms: number): void {
    this.ttft.observe(ms / 1000);
  }

  decodeStep(rows: number, ms: number): void {
    this.decodeTokens.inc(rows);
    this.decodeSeconds.inc(ms / 1000);
    this.steps.push({ rows, ms });
    if (this.steps.length > WINDOW) this.steps.shift();
  }

  finished(r: CompletionResult): void {
    this.promptTokens.inc(r.promptTokens);
    this.completionTokens.inc(r.tokenIds.length);
  }
}
