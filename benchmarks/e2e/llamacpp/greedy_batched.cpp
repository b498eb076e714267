// The e2e benchmark's llama.cpp driver: N prompts (token ids) decoded as N parallel sequences,
// greedy, G new tokens each; prints the generated ids and the prefill and decode wall times as one
// JSON line on stdout. Modelled on llama.cpp's examples/batched and tools/batched-bench.
//
//   greedy_batched --model M.gguf --prompts FILE --new-tokens G --threads T [--eos 2,7]
//
// FILE: one prompt per line, token ids separated by spaces. The model is memory-mapped (llama.cpp's
// default, what its users run models larger than RAM with): its pages are read on first touch and
// dropped by the kernel under memory pressure. One llama_batch carries every prompt's tokens, one
// seq_id per prompt; n_batch = n_ubatch = N x P, so the whole prefill is one forward pass; each
// decode step is one batch of one token per unfinished sequence. Greedy: the argmax of the last
// position's logits (the first index of the maximum, as torch.argmax), as transformers' greedy.
// A sequence ends after an --eos token (kept) or G tokens.
//
// Output: {"tokens": [[...], ...], "prefill_s": s, "decode_s": s, "load_s": s,
//          "bytes_read": b, "n_ctx": c, "n_batch": b, "threads": t}
// prefill_s: the prompt batch's forward pass and the first token of every sequence; decode_s:
// every later step; load_s: model load and context creation (not counted); bytes_read:
// read_bytes of /proc/self/io over prefill and decode (what came from the drive; -1 if unreadable).

#include "llama.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace {

struct Args {
    std::string model;
    std::string prompts;
    int new_tokens = 0;
    int threads = 0;
    std::vector<llama_token> eos;
};

[[noreturn]] void fail(const std::string & message) {
    std::fprintf(stderr, "greedy_batched: %s\n", message.c_str());
    std::exit(1);
}

std::vector<llama_token> parse_ids(const std::string & text, char separator) {
    std::vector<llama_token> ids;
    std::string item;
    std::istringstream stream(text);
    while (std::getline(stream, item, separator)) {
        if (item.empty()) {
            continue;
        }
        char * end = nullptr;
        const long value = std::strtol(item.c_str(), &end, 10);
        if (end == item.c_str() || *end != '\0' || value < 0) {
            fail("not a token id: '" + item + "'");
        }
        ids.push_back(static_cast<llama_token>(value));
    }
    return ids;
}

Args parse_args(int argc, char ** argv) {
    Args args;
    for (int i = 1; i < argc; ++i) {
        const std::string flag = argv[i];
        if (i + 1 >= argc) {
            fail("missing a value after " + flag);
        }
        const std::string value = argv[++i];
        if (flag == "--model") {
            args.model = value;
        } else if (flag == "--prompts") {
            args.prompts = value;
        } else if (flag == "--new-tokens") {
            args.new_tokens = std::atoi(value.c_str());
        } else if (flag == "--threads") {
            args.threads = std::atoi(value.c_str());
        } else if (flag == "--eos") {
            args.eos = parse_ids(value, ',');
        } else {
            fail("unknown option " + flag);
        }
    }
    if (args.model.empty() || args.prompts.empty() || args.new_tokens < 1 || args.threads < 1) {
        fail("usage: greedy_batched --model M.gguf --prompts FILE --new-tokens G --threads T [--eos IDS]");
    }
    return args;
}

std::vector<std::vector<llama_token>> read_prompts(const std::string & path) {
    std::ifstream file(path);
    if (!file) {
        fail("cannot read " + path);
    }
    std::vector<std::vector<llama_token>> prompts;
    std::string line;
    while (std::getline(file, line)) {
        std::vector<llama_token> ids = parse_ids(line, ' ');
        if (!ids.empty()) {
            prompts.push_back(std::move(ids));
        }
    }
    if (prompts.empty()) {
        fail(path + " holds no prompt");
    }
    return prompts;
}

long long drive_read_bytes() {
    std::ifstream io("/proc/self/io");
    std::string key;
    long long value = 0;
    while (io >> key >> value) {
        if (key == "read_bytes:") {
            return value;
        }
    }
    return -1;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

void quiet_log(ggml_log_level level, const char * text, void *) {
    if (level == GGML_LOG_LEVEL_ERROR || level == GGML_LOG_LEVEL_WARN) {
        std::fputs(text, stderr);
    }
}

void add_token(llama_batch & batch, llama_token id, llama_pos pos, llama_seq_id seq, bool logits) {
    const int i = batch.n_tokens++;
    batch.token[i] = id;
    batch.pos[i] = pos;
    batch.n_seq_id[i] = 1;
    batch.seq_id[i][0] = seq;
    batch.logits[i] = logits ? 1 : 0;
}

llama_token argmax(const float * logits, int n_vocab) {
    return static_cast<llama_token>(std::max_element(logits, logits + n_vocab) - logits);
}

}  // namespace

int main(int argc, char ** argv) {
    const Args args = parse_args(argc, argv);
    const std::vector<std::vector<llama_token>> prompts = read_prompts(args.prompts);
    const int n_seq = static_cast<int>(prompts.size());
    int prompt_tokens = 0;
    int longest = 0;
    for (const auto & prompt : prompts) {
        prompt_tokens += static_cast<int>(prompt.size());
        longest = std::max(longest, static_cast<int>(prompt.size()));
    }

    llama_log_set(quiet_log, nullptr);
    llama_backend_init();
    const auto load_start = std::chrono::steady_clock::now();

    llama_model_params model_params = llama_model_default_params();
    model_params.n_gpu_layers = 0;
    model_params.load_mode = LLAMA_LOAD_MODE_MMAP;  // the default on a CPU, stated
    llama_model * model = llama_model_load_from_file(args.model.c_str(), model_params);
    if (model == nullptr) {
        fail("cannot load " + args.model);
    }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);

    llama_context_params ctx_params = llama_context_default_params();
    ctx_params.n_seq_max = static_cast<uint32_t>(n_seq);
    ctx_params.n_ctx = static_cast<uint32_t>(n_seq * (longest + args.new_tokens));
    ctx_params.n_batch = static_cast<uint32_t>(std::max(prompt_tokens, n_seq));
    ctx_params.n_ubatch = ctx_params.n_batch;  // the whole prefill in one forward pass
    ctx_params.n_threads = args.threads;
    ctx_params.n_threads_batch = args.threads;
    ctx_params.no_perf = true;
    llama_context * ctx = llama_init_from_model(model, ctx_params);
    if (ctx == nullptr) {
        fail("cannot create a context");
    }
    const double load_s = seconds_since(load_start);

    std::vector<std::vector<llama_token>> generated(n_seq);
    std::vector<int> row(n_seq, -1);  // the batch row of each sequence's last token; -1: finished
    llama_batch batch = llama_batch_init(std::max(prompt_tokens, n_seq), 0, 1);
    for (int s = 0; s < n_seq; ++s) {
        const auto & prompt = prompts[s];
        for (size_t p = 0; p < prompt.size(); ++p) {
            const bool last = p + 1 == prompt.size();
            if (last) {
                row[s] = batch.n_tokens;
            }
            add_token(batch, prompt[p], static_cast<llama_pos>(p), s, last);
        }
    }

    const long long read_before = drive_read_bytes();
    auto step_start = std::chrono::steady_clock::now();
    double prefill_s = 0.0;
    double decode_s = 0.0;
    for (int step = 0; step < args.new_tokens; ++step) {
        const int rc = llama_decode(ctx, batch);
        if (rc != 0) {
            fail("llama_decode returned " + std::to_string(rc) + " at step " + std::to_string(step));
        }
        std::vector<llama_token> chosen(n_seq, -1);
        for (int s = 0; s < n_seq; ++s) {
            if (row[s] < 0) {
                continue;
            }
            chosen[s] = argmax(llama_get_logits_ith(ctx, row[s]), n_vocab);
            generated[s].push_back(chosen[s]);
        }
        batch.n_tokens = 0;
        for (int s = 0; s < n_seq; ++s) {
            if (row[s] < 0) {
                continue;
            }
            const bool stop = std::find(args.eos.begin(), args.eos.end(), chosen[s]) != args.eos.end();
            if (stop || static_cast<int>(generated[s].size()) == args.new_tokens) {
                row[s] = -1;
                continue;
            }
            row[s] = batch.n_tokens;
            const auto pos = static_cast<llama_pos>(prompts[s].size() + generated[s].size() - 1);
            add_token(batch, chosen[s], pos, s, true);
        }
        (step == 0 ? prefill_s : decode_s) += seconds_since(step_start);
        step_start = std::chrono::steady_clock::now();
        if (batch.n_tokens == 0) {
            break;
        }
    }
    const long long read_after = drive_read_bytes();
    const long long bytes_read = read_before < 0 || read_after < 0 ? -1 : read_after - read_before;

    std::ostringstream out;
    out.precision(9);
    out << "{\"tokens\": [";
    for (int s = 0; s < n_seq; ++s) {
        out << (s ? ", [" : "[");
        for (size_t t = 0; t < generated[s].size(); ++t) {
            out << (t ? ", " : "") << generated[s][t];
        }
        out << "]";
    }
    out << "], \"prefill_s\": " << prefill_s << ", \"decode_s\": " << decode_s << ", \"load_s\": " << load_s
        << ", \"bytes_read\": " << bytes_read << ", \"n_ctx\": " << llama_n_ctx(ctx)
        << ", \"n_batch\": " << llama_n_batch(ctx) << ", \"n_ubatch\": " << llama_n_ubatch(ctx)
        << ", \"threads\": " << args.threads << "}";
    std::printf("%s\n", out.str().c_str());
    std::fflush(stdout);

    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
