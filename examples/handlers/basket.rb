# Drops each item in the basket: one JSON line in, one JSON line out (the exec line protocol).
require "json"
$stdout.sync = true
$stdin.each_line do |line|
  msg = JSON.parse(line)
  puts JSON.generate({id: msg["id"], outputs: [msg["data"].merge("basket" => "blue")]})
end
