"""Run by the OpenVINO virtualenv's python (never imported by tokenloom): loads an LLMPipeline,
prints {"load_s": ...}, then for each JSON job on stdin prints one JSON line of figures.

Usage: python openvino_worker.py MODEL_DIR THREADS"""

import json
import sys
import time

import openvino_genai as ov_genai


def config(pipe, new_tokens):
    cfg = pipe.get_generation_config()
    cfg.max_new_tokens = new_tokens
    cfg.min_new_tokens = new_tokens
    cfg.ignore_eos = True
    cfg.do_sample = False
    return cfg


def peak_rss_mib():
    # VmHWM, not ru_maxrss: ru_maxrss survives execve, so it would report the parent's peak
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main():
    model_dir, threads = sys.argv[1], int(sys.argv[2])
    start = time.perf_counter()
    pipe = ov_genai.LLMPipeline(model_dir, "CPU", INFERENCE_NUM_THREADS=threads)
    print(json.dumps({"load_s": time.perf_counter() - start}), flush=True)
    pipe.generate("Hello there", config(pipe, 4))  # warm-up
    for line in sys.stdin:
        job = json.loads(line)
        n = job["new_tokens"]
        out = {}
        # a list in, DecodedResults (with perf_metrics) out; a lone string would give back a string
        metrics = pipe.generate([job["decode_prompt"]], config(pipe, n)).perf_metrics
        out["decode_1_tok_s"] = 1000.0 / metrics.get_tpot().mean
        prompts = job["batch_prompts"]
        start = time.perf_counter()
        pipe.generate(prompts, config(pipe, n))
        out["decode_batch_tok_s"] = len(prompts) * n / (time.perf_counter() - start)
        best = 0.0
        for text in job["prefill_prompts"]:  # each distinct: the prefix cache cannot serve it
            metrics = pipe.generate([text], config(pipe, 1)).perf_metrics
            best = max(best, metrics.get_num_input_tokens() / (metrics.get_ttft().mean / 1000.0))
        out["prefill_tok_s"] = best
        metrics = pipe.generate([job["long_prompt"]], config(pipe, n)).perf_metrics
        out["decode_long_tok_s"] = 1000.0 / metrics.get_tpot().mean
        out["long_context_tokens"] = metrics.get_num_input_tokens()
        first, second = job["chat"]
        pipe.start_chat()
        pipe.generate(first, config(pipe, n))
        stamps = []

        def streamer(_subword, stamps=stamps):
            stamps.append(time.perf_counter())
            return False  # go on

        start = time.perf_counter()
        pipe.generate(second, config(pipe, 1), streamer=streamer)
        pipe.finish_chat()
        out["turn2_ttft_ms"] = 1000.0 * ((stamps[0] if stamps else time.perf_counter()) - start)
        out["peak_rss_mib"] = peak_rss_mib()
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
