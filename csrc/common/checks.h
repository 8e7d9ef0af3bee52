// Host-side argument checks. They guard memory safety only; user-facing validation
// (names, values, dtypes) happens in gmp_ext/ops.py before any pointer is taken.
// pybind11 maps std::invalid_argument -> ValueError and std::runtime_error -> RuntimeError.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace gmp::detail {

template <typename... Args> std::string concat(const Args &...args) {
    std::ostringstream os;
    (os << ... << args);
    return os.str();
}

} // namespace gmp::detail

#define GMP_CHECK(cond, ...)                                                                                           \
    do {                                                                                                               \
        if (!(cond))                                                                                                   \
            throw std::invalid_argument(::gmp::detail::concat("gmp_ext._C: ", __VA_ARGS__));                           \
    } while (0)

#define GMP_RUNTIME_CHECK(cond, ...)                                                                                   \
    do {                                                                                                               \
        if (!(cond))                                                                                                   \
            throw std::runtime_error(::gmp::detail::concat("gmp_ext._C: ", __VA_ARGS__));                              \
    } while (0)
