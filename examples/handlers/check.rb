# Accepts numbers that are not multiples of ten, and answers with an error for the others.
require "json"
$stdout.sync = true
$stdin.each_line do |line|
  msg = JSON.parse(line)
  n = msg["data"]["n"]
  puts JSON.generate(n % 10 == 0 ? {id: msg["id"], error: "#{n} is a multiple of ten"} : {id: msg["id"], outputs: [{n: n, ok: true}]})
end
